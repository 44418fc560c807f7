//! The weight readers on thousands of damaged files: truncations, bit flips, pickle edits
//! with the zip's CRC made right again, safetensors header edits and huge sizes. Each must be
//! refused with an error that names the file, or load; none may panic.
//!
//! The `.pth` mutants also go through burn-store's `PytorchStore`, the reader Burn ships, and
//! the test prints how each reader fared (the comparison behind the choice of reader in
//! `src/pth.rs`).

use std::io::{Cursor, Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::store::{ModuleSnapshot, PytorchStore};
use burn::tensor::Device;
use resnet_burn::{BlockKind, ImportError, ResNet, ResNetConfig, Stem};

use crate::support::{fixture, tempdir};

/// The network of the `parity_basic` fixtures.
fn basic() -> ResNet {
    ResNetConfig::new(BlockKind::Basic, [2, 1, 1, 1])
        .with_num_classes(10)
        .with_base_channels(8)
        .with_stem(Stem::Cifar)
        .init(&Device::flex())
}

/// A small, seeded generator (SplitMix64): the same mutants on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `bytes` cut at a random length.
fn truncated(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    bytes[..rng.below(bytes.len())].to_vec()
}

/// `bytes` with one to eight random bits flipped.
fn bit_flipped(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(out.len());
        out[at] ^= 1 << rng.below(8);
    }
    out
}

/// The entries of a zip archive, in order.
fn unzip(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).expect("a zip");
    (0..zip.len())
        .map(|i| {
            let mut file = zip.by_index(i).expect("an entry");
            let mut data = Vec::new();
            file.read_to_end(&mut data).expect("readable");
            (file.name().to_owned(), data)
        })
        .collect()
}

/// A zip archive of `entries`, stored as torch.save stores them, with right CRCs.
fn zip_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in entries {
        out.start_file(name.as_str(), options).expect("an entry");
        out.write_all(data).expect("written");
    }
    out.finish().expect("a zip").into_inner()
}

/// The archive with its pickle edited: a byte replaced, a run of bytes deleted, a byte
/// inserted, or a length or index field pushed to a huge value; the CRC is right again.
fn pickle_edited(entries: &[(String, Vec<u8>)], rng: &mut Rng) -> Vec<u8> {
    let mut entries = entries.to_vec();
    let (_, pickle) = entries
        .iter_mut()
        .find(|(name, _)| name.ends_with("data.pkl"))
        .expect("a pickle");
    let at = rng.below(pickle.len());
    match rng.below(4) {
        0 => pickle[at] = rng.next() as u8,
        1 => {
            let end = (at + 1 + rng.below(8)).min(pickle.len());
            pickle.drain(at..end);
        }
        2 => pickle.insert(at, rng.next() as u8),
        _ => {
            let end = (at + 4).min(pickle.len());
            pickle[at..end].fill(0xff);
        }
    }
    zip_of(&entries)
}

/// The safetensors file with its JSON header edited (a number made huge or negative, a dtype
/// or a shape changed, the header's length field changed).
fn header_edited(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
    let length = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = String::from_utf8(bytes[8..8 + length].to_vec()).expect("a JSON header");
    let body = &bytes[8 + length..];
    let edited = match rng.below(5) {
        0 => header.replacen("\"F32\"", "\"F64\"", 1 + rng.below(3)),
        1 => {
            // A digit run replaced by a huge number.
            let digits: Vec<usize> = header
                .match_indices(char::is_numeric)
                .map(|(i, _)| i)
                .collect();
            let at = digits[rng.below(digits.len())];
            format!("{}99999999999999999{}", &header[..at], &header[at + 1..])
        }
        2 => header.replacen("[", "[4294967296,", 1),
        3 => header.replacen(",", ",-1,", 1),
        _ => {
            let mut out = bytes.to_vec();
            let claimed = (length as u64).wrapping_add(1 + rng.next() % (1 << 40));
            out[..8].copy_from_slice(&claimed.to_le_bytes());
            return out;
        }
    };
    let mut out = (edited.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(edited.as_bytes());
    out.extend_from_slice(body);
    out
}

/// How one reader fared on one file.
#[derive(Debug, Default)]
struct Tally {
    loaded: usize,
    errors: usize,
    panics: usize,
}

impl Tally {
    fn count<T, E>(&mut self, outcome: std::thread::Result<Result<T, E>>) {
        match outcome {
            Ok(Ok(_)) => self.loaded += 1,
            Ok(Err(_)) => self.errors += 1,
            Err(_) => self.panics += 1,
        }
    }
}

/// Runs `f` with the panics of this thread unprinted (they are counted instead).
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let this = std::thread::current().id();
    let previous: Arc<PanicHook> = Arc::from(std::panic::take_hook());
    let inner = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != this {
            inner(info)
        }
    }));
    let out = f();
    std::panic::set_hook(Box::new(move |info| previous(info)));
    out
}

type PanicHook = dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static;

/// resnet-burn's reader on `path`: a load or an error that names the file; anything else is
/// added to `failures`.
fn ours(path: &Path, tally: &mut Tally, failures: &mut Vec<String>, what: &str) {
    let outcome = catch_unwind(AssertUnwindSafe(|| basic().load_torchvision(path)));
    match &outcome {
        Ok(Err(error)) => {
            let message = error.to_string();
            let named = message.contains(&path.display().to_string())
                || matches!(error, ImportError::Mismatch { .. });
            if !named {
                failures.push(format!(
                    "{what}: the error does not name the file: {message}"
                ));
            }
        }
        Err(_) => failures.push(format!("{what}: resnet-burn's reader panicked")),
        Ok(Ok(_)) => {}
    }
    tally.count(outcome);
}

/// burn-store's `PytorchStore` on `path`, with torchvision's key names mapped to the model's.
fn burn_store(path: &Path, tally: &mut Tally) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut store = PytorchStore::from_file(path)
            .with_key_remapping(r"downsample\.0\.", "downsample.conv.")
            .with_key_remapping(r"downsample\.1\.", "downsample.bn.")
            .skip_enum_variants(true)
            .allow_partial(true);
        let mut model = basic();
        model.load_from(&mut store).map(|_| model.num_params())
    }));
    tally.count(outcome);
}

/// Runs `mutants` mutants of each kind through the readers and returns the tallies by kind.
fn pth_mutants(mutants: usize, failures: &mut Vec<String>) -> Vec<(&'static str, Tally, Tally)> {
    let original = std::fs::read(fixture("parity_basic.pth")).expect("the fixture");
    let entries = unzip(&original);
    let dir = tempdir().join("pth-mutants");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(2026);
    type Mutator<'a> = Box<dyn Fn(&mut Rng) -> Vec<u8> + 'a>;
    let kinds: [(&str, Mutator); 3] = [
        (
            "truncation",
            Box::new(|rng: &mut Rng| truncated(&original, rng)),
        ),
        (
            "bit flips",
            Box::new(|rng: &mut Rng| bit_flipped(&original, rng)),
        ),
        (
            "pickle edit",
            Box::new(|rng: &mut Rng| pickle_edited(&entries, rng)),
        ),
    ];
    let path = dir.join("mutant.pth");
    kinds
        .into_iter()
        .map(|(kind, mutate)| {
            let (mut ours_tally, mut theirs) = (Tally::default(), Tally::default());
            for i in 0..mutants {
                std::fs::write(&path, mutate(&mut rng)).unwrap();
                ours(&path, &mut ours_tally, failures, &format!("{kind} #{i}"));
                burn_store(&path, &mut theirs);
            }
            (kind, ours_tally, theirs)
        })
        .collect()
}

#[test]
fn damaged_pth_files_are_errors_never_panics() {
    let mut failures = Vec::new();
    let mut baseline = (Tally::default(), Tally::default());
    let results = quietly(|| {
        ours(
            &fixture("parity_basic.pth"),
            &mut baseline.0,
            &mut failures,
            "the fixture",
        );
        burn_store(&fixture("parity_basic.pth"), &mut baseline.1);
        pth_mutants(200, &mut failures)
    });
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(
        baseline.0.loaded, 1,
        "resnet-burn reads the undamaged fixture"
    );
    println!(
        "the undamaged fixture: resnet-burn {:?}, PytorchStore {:?}",
        baseline.0, baseline.1
    );
    for (kind, ours, theirs) in &results {
        println!("{kind}: resnet-burn {ours:?}; burn-store's PytorchStore {theirs:?}");
        assert_eq!(ours.panics, 0);
        assert!(ours.errors > 0, "{kind}: no mutant was refused");
    }
}

#[test]
fn damaged_safetensors_files_are_errors_never_panics() {
    let original = std::fs::read(fixture("parity_basic.safetensors")).expect("the fixture");
    let dir = tempdir().join("safetensors-mutants");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mutant.safetensors");
    let mut rng = Rng(7);
    let mut failures = Vec::new();
    let mut tallies = Vec::new();
    type Mutator<'a> = fn(&[u8], &mut Rng) -> Vec<u8>;
    let kinds: [(&str, Mutator); 3] = [
        ("truncation", truncated),
        ("bit flips", bit_flipped),
        ("header edit", header_edited),
    ];
    quietly(|| {
        for (kind, mutate) in kinds {
            let mut tally = Tally::default();
            for i in 0..200 {
                std::fs::write(&path, mutate(&original, &mut rng)).unwrap();
                ours(&path, &mut tally, &mut failures, &format!("{kind} #{i}"));
            }
            tallies.push((kind, tally));
        }
    });
    assert!(failures.is_empty(), "{failures:#?}");
    for (kind, tally) in tallies {
        println!("{kind}: {tally:?}");
        assert_eq!(tally.panics, 0);
        assert!(tally.errors > 0, "{kind}: no mutant was refused");
    }
}
