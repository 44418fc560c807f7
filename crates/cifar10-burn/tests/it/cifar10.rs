//! The reader on generated files in the official format, on the real data when `CIFAR10_DIR`
//! is set, augmentation properties and batches.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::tensor::Device;
use cifar10_burn::augment::{Choice, crop, cutout, flip_horizontal, normalize};
use cifar10_burn::format::{IMAGE_BYTES, RECORD_BYTES};

use crate::files::{image, scratch, write_fake_cifar};
use cifar10_burn::{
    Augmentation, Cifar10Batcher, Cifar10Dataset, Cifar10Error, Cifar10Item, EpochLoader,
    HostBatch, Rng, Split, part_range,
};

fn write_tar_gz(archive: &Path, folder: &Path, prefix: &str) {
    let file = std::fs::File::create(archive).expect("archive");
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(prefix, folder).expect("tar");
    tar.into_inner().expect("tar").finish().expect("gz");
}

#[test]
fn reads_the_folder_its_parent_and_the_archive() {
    let root = scratch("forms");
    let batches = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&batches).unwrap();
    write_fake_cifar(&batches, 20);

    let from_folder = Cifar10Dataset::new(&batches, Split::Train).expect("folder");
    assert_eq!(from_folder.len(), 100); // 5 files x 20 records, counted from the lengths
    let item = from_folder.get(21).expect("item");
    assert_eq!(item.label, 1);
    assert_eq!(item.image.as_slice(), image(1, 1001).as_slice());
    let as_ref: &[u8] = item.image.as_ref();
    assert_eq!(as_ref.len(), 3072);

    let from_parent = Cifar10Dataset::new(&root, Split::Test).expect("parent");
    assert_eq!(from_parent.len(), 20);

    let archive = root.join("cifar-10-binary.tar.gz");
    write_tar_gz(&archive, &batches, "cifar-10-batches-bin");
    let from_archive = Cifar10Dataset::new(&archive, Split::Train).expect("archive");
    assert_eq!(from_archive.images(), from_folder.images());
    assert_eq!(from_archive.labels(), from_folder.labels());

    // A folder that holds only the archive.
    let only_archive = scratch("only-archive");
    std::fs::copy(&archive, only_archive.join("cifar-10-binary.tar.gz")).unwrap();
    let test = Cifar10Dataset::new(&only_archive, Split::Test).expect("archive in folder");
    assert_eq!(test.labels(), from_parent.labels());
}

#[test]
fn bad_files_are_errors_that_name_the_file() {
    let dir = scratch("bad");
    write_fake_cifar(&dir, 3);

    // Missing file.
    std::fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
    match Cifar10Dataset::new(&dir, Split::Train) {
        Err(Cifar10Error::Missing { path }) => assert!(path.ends_with("data_batch_4.bin")),
        other => panic!("expected Missing, got {other:?}"),
    }
    let message = Cifar10Dataset::new(&dir, Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("data_batch_4.bin") && message.contains("cifar-10-binary.tar.gz"),
        "{message}"
    );
    match Cifar10Dataset::new(dir.join("nowhere"), Split::Test) {
        Err(Cifar10Error::Missing { .. }) => {}
        other => panic!("expected Missing, got {other:?}"),
    }

    // Truncated file.
    let test = dir.join("test_batch.bin");
    let bytes = std::fs::read(&test).unwrap();
    std::fs::write(&test, &bytes[..RECORD_BYTES * 2 + 100]).unwrap();
    match Cifar10Dataset::new(&dir, Split::Test) {
        Err(Cifar10Error::Length { path, len }) => {
            assert_eq!(path, test);
            assert_eq!(len, (RECORD_BYTES * 2 + 100) as u64);
        }
        other => panic!("expected Length, got {other:?}"),
    }
    std::fs::write(&test, []).unwrap();
    assert!(matches!(
        Cifar10Dataset::new(&dir, Split::Test),
        Err(Cifar10Error::Length { len: 0, .. })
    ));

    // A label above 9 in the third record.
    let mut corrupt = bytes.clone();
    corrupt[2 * RECORD_BYTES] = 12;
    std::fs::write(&test, corrupt).unwrap();
    match Cifar10Dataset::new(&dir, Split::Test) {
        Err(Cifar10Error::Label {
            path,
            record,
            offset,
            label,
        }) => {
            assert_eq!((record, offset, label), (2, 2 * RECORD_BYTES as u64, 12));
            assert_eq!(path, test);
        }
        other => panic!("expected Label, got {other:?}"),
    }

    // An archive that is not one.
    let archive = dir.join("broken.tar.gz");
    std::fs::write(&archive, b"this is not gzip").unwrap();
    match Cifar10Dataset::new(&archive, Split::Test) {
        Err(Cifar10Error::Archive { path, .. }) => assert_eq!(path, archive),
        other => panic!("expected Archive, got {other:?}"),
    }
    // A valid archive without the split's files.
    let other = scratch("other-archive-content");
    std::fs::write(other.join("readme.txt"), "hello").unwrap();
    let archive = dir.join("empty.tar.gz");
    write_tar_gz(&archive, &other, "something-else");
    let message = Cifar10Dataset::new(&archive, Split::Test)
        .unwrap_err()
        .to_string();
    assert!(message.contains("test_batch.bin"), "{message}");
}

mod download {
    use super::*;
    use cifar10_burn::download::{ensure_from, extract};

    #[test]
    fn a_corrupt_archive_leaves_no_folder_behind() {
        let dir = scratch("extract-corrupt");
        let source = scratch("extract-source");
        write_fake_cifar(&source, 2); // not the official files: checksums differ
        let archive = dir.join("cifar-10-binary.tar.gz");
        write_tar_gz(&archive, &source, "cifar-10-batches-bin");
        match extract(&archive, &dir) {
            Err(Cifar10Error::Checksum {
                algorithm: "SHA-256",
                ..
            }) => {}
            other => panic!("expected a checksum error, got {other:?}"),
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("cifar-10-binary.tar.gz")],
            "{left:?}"
        );
    }

    #[test]
    fn offline_download_says_where_to_put_the_file() {
        let dir = scratch("offline");
        // Port 9 on the loopback: nothing listens, the connection is refused at once.
        let error = ensure_from(&dir, "http://127.0.0.1:9/cifar-10-binary.tar.gz").unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Cifar10Error::Download { .. }), "{error:?}");
        assert!(
            message.contains(&dir.display().to_string()) && message.contains("--data-dir"),
            "{message}"
        );
        assert!(!dir.join("cifar-10-binary.tar.gz").exists());
    }

    #[test]
    fn ensure_finds_data_already_there() {
        let dir = scratch("ensure-present");
        let batches = dir.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&batches).unwrap();
        write_fake_cifar(&batches, 1);
        assert_eq!(
            ensure_from(&dir, "http://127.0.0.1:9/unused").unwrap(),
            batches
        );
        assert_eq!(
            ensure_from(&batches, "http://127.0.0.1:9/unused").unwrap(),
            batches
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The real data set

fn real_data() -> Option<PathBuf> {
    match std::env::var_os("CIFAR10_DIR") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            eprintln!(
                "skipped: CIFAR10_DIR is not set (point it at cifar-10-batches-bin to run this test)"
            );
            None
        }
    }
}

#[test]
fn real_splits_have_their_published_sizes_and_statistics() {
    let Some(dir) = real_data() else { return };
    let test = Cifar10Dataset::new(&dir, Split::Test).expect("test split");
    assert_eq!(test.len(), 10_000);
    assert_eq!(class_counts(test.labels()), [1_000; 10]);

    let train = Cifar10Dataset::new(&dir, Split::Train).expect("train split");
    assert_eq!(train.len(), 50_000);
    assert_eq!(class_counts(train.labels()), [5_000; 10]);
    // In memory it costs its size on disk (5 x 30,730,000 bytes), not more.
    assert!(
        train.memory_bytes() <= 5 * 30_730_000,
        "{} bytes",
        train.memory_bytes()
    );

    let (mean, std) = channel_statistics(train.images());
    for c in 0..3 {
        assert!(
            (mean[c] - [125.307, 122.950, 113.865][c]).abs() < 0.01,
            "mean {mean:?}"
        );
        assert!(
            (std[c] - [62.993, 62.089, 66.705][c]).abs() < 0.01,
            "std {std:?}"
        );
    }
}

fn class_counts(labels: &[u8]) -> [usize; 10] {
    let mut counts = [0; 10];
    for &label in labels {
        counts[label as usize] += 1;
    }
    counts
}

fn channel_statistics(images: &[u8]) -> ([f64; 3], [f64; 3]) {
    let mut sum = [0f64; 3];
    let mut squares = [0f64; 3];
    for image in images.chunks_exact(IMAGE_BYTES) {
        for (c, plane) in image.chunks_exact(1024).enumerate() {
            for &p in plane {
                sum[c] += p as f64;
                squares[c] += (p as f64) * (p as f64);
            }
        }
    }
    let n = (images.len() / 3) as f64;
    let mean = sum.map(|s| s / n);
    let std = [0, 1, 2].map(|c| (squares[c] / n - mean[c] * mean[c]).sqrt());
    (mean, std)
}

// ---------------------------------------------------------------------------------------------
// Augmentation

#[test]
fn crop_keeps_the_shape_and_moves_pixels() {
    let img = image(3, 7);
    let centre = crop(&img, 4, (4, 4));
    assert_eq!(centre, img, "the centred crop is the image");
    let shifted = crop(&img, 4, (0, 0)); // 4 black rows and columns on top and left
    assert_eq!(shifted.len(), IMAGE_BYTES);
    assert_eq!(shifted[0], 0);
    assert_eq!(shifted[4 * 32 + 4], img[0]);
    assert_eq!(shifted[1024 + 5 * 32 + 6], img[1024 + 32 + 2]);
}

#[test]
fn flip_is_its_own_inverse() {
    let img = image(5, 9);
    let flipped = flip_horizontal(&img);
    assert_ne!(flipped, img);
    assert_eq!(flipped[0], img[31]);
    assert_eq!(flip_horizontal(&flipped), img);
}

#[test]
fn the_fused_pass_equals_the_steps_one_after_another() {
    let img = image(2, 11);
    let augmentation = Augmentation {
        cutout: Some(8),
        ..Augmentation::default()
    };
    let mut rng = Rng::new(3);
    for _ in 0..50 {
        let choice = augmentation.draw(&mut rng);
        let mut fused = vec![0f32; IMAGE_BYTES];
        augmentation.apply(&img, choice, &mut fused);

        let mut stepwise = crop(&img, 4, choice.offset);
        if choice.flip {
            stepwise = flip_horizontal(&stepwise);
        }
        let mut expected = vec![0f32; IMAGE_BYTES];
        normalize(&stepwise, &mut expected);
        cutout(&mut expected, 8, choice.cutout_center.expect("cutout on"));
        assert_eq!(fused, expected, "{choice:?}");
    }
    // Normalization alone: the mean pixel maps to 0.
    let mut out = vec![0f32; IMAGE_BYTES];
    normalize(&[125u8; IMAGE_BYTES], &mut out);
    assert!(out[0].abs() < 0.01 && out[0] < 0.0);
}

#[test]
fn cutout_clips_at_the_border() {
    let mut img = vec![1f32; IMAGE_BYTES];
    cutout(&mut img, 16, (0, 31));
    let zeros = img.iter().filter(|v| **v == 0.0).count();
    assert_eq!(zeros, 3 * 8 * 9); // rows 0..8, columns 23..32
    // No Cutout drawn: the centred, unflipped crop is plain normalization.
    let choice = Choice {
        offset: (4, 4),
        flip: false,
        cutout_center: None,
    };
    let mut out = vec![0f32; IMAGE_BYTES];
    Augmentation::default().apply(&image(0, 0), choice, &mut out);
    let mut expected = vec![0f32; IMAGE_BYTES];
    normalize(&image(0, 0), &mut expected);
    assert_eq!(out, expected);
}

#[test]
fn same_seed_same_batch() {
    let dir = scratch("seeded");
    write_fake_cifar(&dir, 40);
    let train = Arc::new(Cifar10Dataset::new(&dir, Split::Train).unwrap());
    let loader = |seed| EpochLoader::train(train.clone(), 16, Some(Augmentation::default()), seed);

    let a: Vec<HostBatch> = loader(7).epoch(0, 2).collect();
    let b: Vec<HostBatch> = loader(7).epoch(0, 2).collect();
    assert_eq!(a, b);
    assert_eq!(a.len(), 200 / 16); // the last partial batch is dropped
    let c: Vec<HostBatch> = loader(8).epoch(0, 2).collect();
    assert_ne!(a, c);
    let next_epoch: Vec<HostBatch> = loader(7).epoch(1, 2).collect();
    assert_ne!(a, next_epoch);

    // Each epoch visits every image once.
    let mut seen: Vec<usize> = loader(7).batches(3).concat();
    seen.sort_unstable();
    assert_eq!(seen, (0..192).map(|i| seen[i]).collect::<Vec<_>>());
    seen.dedup();
    assert_eq!(seen.len(), 192);

    // Evaluation keeps the order and every image.
    let eval = EpochLoader::eval(train.clone(), 64);
    assert_eq!(eval.batches(0).concat(), (0..200).collect::<Vec<_>>());
}

#[test]
fn batcher_makes_normalized_device_tensors() {
    let device = Device::flex();
    let items: Vec<Cifar10Item> = (0..4u8)
        .map(|l| Cifar10Item {
            image: image(l, l as usize),
            label: l,
        })
        .collect();
    let batch = Cifar10Batcher::eval().batch(items.clone(), &device);
    assert_eq!(batch.images.dims(), [4, 3, 32, 32]);
    let targets: Vec<i64> = batch.targets.into_data().try_into_vec_as::<i64>().unwrap();
    assert_eq!(targets, vec![0, 1, 2, 3]);
    let pixels: Vec<f32> = batch.images.into_data().try_into_vec_as::<f32>().unwrap();
    let mut expected = vec![0f32; IMAGE_BYTES];
    normalize(&items[2].image, &mut expected);
    assert_eq!(
        &pixels[2 * IMAGE_BYTES..3 * IMAGE_BYTES],
        expected.as_slice()
    );

    let train = Cifar10Batcher::train(Augmentation::default(), 1);
    let augmented = train
        .batch(items.clone(), &device)
        .images
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert_ne!(augmented, pixels);
    let again = Cifar10Batcher::train(Augmentation::default(), 1)
        .batch(items, &device)
        .images
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert_eq!(augmented, again);
}

#[test]
fn a_batch_splits_into_near_equal_consecutive_shards() {
    let batch = HostBatch {
        pixels: (0..10 * IMAGE_BYTES).map(|v| v as f32).collect(),
        labels: (0..10).collect(),
    };
    let shards = batch.clone().split(3);
    let sizes: Vec<usize> = shards.iter().map(HostBatch::len).collect();
    assert_eq!(sizes, [4, 3, 3]);
    assert_eq!(
        shards
            .iter()
            .flat_map(|s| s.labels.clone())
            .collect::<Vec<_>>(),
        batch.labels
    );
    assert_eq!(
        shards
            .iter()
            .flat_map(|s| s.pixels.clone())
            .collect::<Vec<_>>(),
        batch.pixels
    );
    assert_eq!(shards[1].pixels[0], (4 * IMAGE_BYTES) as f32);

    let whole: Vec<usize> = batch.clone().split(1).iter().map(HostBatch::len).collect();
    assert_eq!(whole, [10]);
    let small = HostBatch {
        pixels: vec![0.0; 2 * IMAGE_BYTES],
        labels: vec![1, 2],
    };
    assert_eq!(small.split(5).len(), 2); // a shard an image, never an empty one
    let empty = HostBatch {
        pixels: Vec::new(),
        labels: Vec::new(),
    };
    assert!(empty.split(2).is_empty());
}

/// The parts of every batch, prepared apart as the processes of a distributed run prepare
/// them, join into the batch the whole loader gives, augmentation included, for training and
/// evaluation loaders, and for batches that do not divide evenly.
#[test]
fn the_parts_of_a_batch_join_into_the_batch() {
    let dir = scratch("parts");
    write_fake_cifar(&dir, 40);
    let train = Arc::new(Cifar10Dataset::new(&dir, Split::Train).unwrap());
    let augmentation = Some(Augmentation {
        cutout: Some(8),
        ..Augmentation::default()
    });
    let loaders = [
        EpochLoader::train(train.clone(), 15, augmentation, 3),
        EpochLoader::eval(train.clone(), 64), // the last batch holds 8 images
    ];
    for loader in loaders {
        let whole: Vec<HostBatch> = loader.epoch(1, 2).collect();
        for parts in [2, 3, 5] {
            let mut joined = vec![HostBatch::default(); whole.len()];
            for part in 0..parts {
                let shard: Vec<HostBatch> = loader.clone().part(part, parts).epoch(1, 2).collect();
                for (batch, piece) in joined.iter_mut().zip(shard) {
                    batch.pixels.extend(piece.pixels);
                    batch.labels.extend(piece.labels);
                }
            }
            assert_eq!(joined, whole, "{parts} parts");
        }
    }
    let sizes: Vec<usize> = (0..4).map(|part| part_range(10, 4, part).len()).collect();
    assert_eq!(sizes, [3, 3, 2, 2]);
    assert!(part_range(2, 3, 2).is_empty());
}

/// Whether `error` names `path`.
fn named(error: &Cifar10Error, path: &Path) -> bool {
    error.to_string().contains(&path.display().to_string())
}

/// Damaged batch files and archives, seeded: truncations, bit flips (labels above 9 among
/// them) and tar headers that claim huge sizes. Each is refused with an error that names the
/// file, or read (a flipped pixel is still a picture); none panics.
#[test]
fn damaged_files_are_errors_never_panics() {
    let dir = scratch("mutants");
    let batches = dir.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&batches).unwrap();
    write_fake_cifar(&batches, 20);
    let archive = dir.join("cifar-10-binary.tar.gz");
    write_tar_gz(&archive, &batches, "cifar-10-batches-bin");
    let test = batches.join("test_batch.bin");
    let original = std::fs::read(&test).unwrap();
    let archive_bytes = std::fs::read(&archive).unwrap();
    let tar_bytes = {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(archive_bytes.as_slice())
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    let mut state = 2026u64;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n.max(1)
    };
    let (mut read, mut refused, mut failures) = (0, 0, Vec::new());
    let mut check = |path: &Path, what: String, result: std::thread::Result<_>| match result {
        Ok(Ok(_)) => read += 1,
        Ok(Err(error)) if named(&error, path) => refused += 1,
        Ok(Err(error)) => {
            failures.push(format!("{what}: the error does not name the file: {error}"))
        }
        Err(_) => failures.push(format!("{what} panicked")),
    };
    for i in 0..300 {
        let mut bytes = original.clone();
        match i % 3 {
            0 => bytes.truncate(next(bytes.len())),
            1 => {
                for _ in 0..1 + next(8) {
                    let at = next(bytes.len());
                    bytes[at] ^= 1 << next(8);
                }
            }
            _ => bytes[next(20) * RECORD_BYTES] = 10 + next(246) as u8,
        }
        std::fs::write(&test, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| Cifar10Dataset::new(&batches, Split::Test));
        check(&test, format!("batch mutant #{i}"), result);
    }
    std::fs::write(&test, &original).unwrap();
    std::fs::remove_dir_all(&batches).unwrap();
    for i in 0..60 {
        let mut tar = tar_bytes.clone();
        match i % 3 {
            0 => tar.truncate(next(tar.len())),
            1 => {
                // A size field of a tar header (bytes 124..136 of a 512-byte block) made huge.
                let block = 512 * next(tar.len() / 512);
                tar[block + 124..block + 136].copy_from_slice(b"77777777777\0");
            }
            _ => {
                let at = next(tar.len());
                tar[at] ^= 1 << next(8);
            }
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        std::fs::write(&archive, gz.finish().unwrap()).unwrap();
        let result = std::panic::catch_unwind(|| Cifar10Dataset::new(&archive, Split::Train));
        check(&archive, format!("archive mutant #{i}"), result);
    }
    assert!(failures.is_empty(), "{failures:#?}");
    println!("360 damaged files: {refused} refused, {read} read");
    assert!(refused > 200, "only {refused} refused");
}
