//! Fetch, verify and extract the official archive into a cache folder (feature `download`).
//!
//! The archive is downloaded to `<dir>/cifar-10-binary.tar.gz.part`, its published MD5 is
//! checked, its six batch files are extracted into a temporary folder and checked against
//! their SHA-256, and only then is that folder renamed to `<dir>/cifar-10-batches-bin`. An
//! interrupted download or extraction never leaves a folder that looks complete.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::Digest as _;
use sha2::Sha256;

use crate::Cifar10Error;
use crate::dataset::{ARCHIVE_NAME, BATCHES_DIR, Split, for_each_archive_file};

/// Where the official archive lives.
pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The archive's MD5, as published on the CIFAR-10 page.
pub const ARCHIVE_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
/// The archive's size in bytes.
pub const ARCHIVE_BYTES: u64 = 170_052_171;
/// SHA-256 of the six batch files of the official archive.
pub const FILE_SHA256: [(&str, &str); 6] = [
    (
        "data_batch_1.bin",
        "cee916563c9f80d84e3cc88e17fdc0941787f1244f00a67874d45b261883ada5",
    ),
    (
        "data_batch_2.bin",
        "a591ca11fa1708a91ee40f54b3da4784ccd871ecf2137de63f51ada8b3fa57ed",
    ),
    (
        "data_batch_3.bin",
        "bbe8596564c0f86427f876058170b84dac6670ddf06d79402899d93ceea26f67",
    ),
    (
        "data_batch_4.bin",
        "014e562d6e23c72197cc727519169a60359f5eccd8945ad5a09d710285ff4e48",
    ),
    (
        "data_batch_5.bin",
        "755304fc0b379caeae8c14f0dac912fbc7d6cd469eb67a1029a08a39453a9add",
    ),
    (
        "test_batch.bin",
        "8e2eb146ae340b09e24670f29cabc6326dba54da8789dab6768acf480273f65b",
    ),
];

/// The default cache folder, by the platform's convention (XDG's): `$XDG_CACHE_HOME/cifar10-burn`,
/// else `~/.cache/cifar10-burn`. Pass another folder to [`ensure`] to keep the data elsewhere.
pub fn default_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("cifar10-burn")
}

/// Makes sure `dir` holds CIFAR-10 and returns the folder with the batch files: `dir`
/// itself or `dir/cifar-10-batches-bin` when they are there already, else the result of
/// extracting `dir/cifar-10-binary.tar.gz`, downloading it first if it is not there.
pub fn ensure(dir: &Path) -> Result<PathBuf, Cifar10Error> {
    ensure_from(dir, URL)
}

/// [`ensure`] with another address for the archive (a mirror).
pub fn ensure_from(dir: &Path, url: &str) -> Result<PathBuf, Cifar10Error> {
    for candidate in [dir.to_path_buf(), dir.join(BATCHES_DIR)] {
        if complete(&candidate) {
            return Ok(candidate);
        }
    }
    fs::create_dir_all(dir).map_err(|e| Cifar10Error::io(dir, e))?;
    let archive = dir.join(ARCHIVE_NAME);
    if !archive.is_file() {
        download(url, dir, &archive)?;
    }
    extract(&archive, dir)
}

fn complete(dir: &Path) -> bool {
    [Split::Train, Split::Test]
        .iter()
        .flat_map(|split| split.files())
        .all(|name| dir.join(name).is_file())
}

/// Downloads `url` to `archive` through a `.part` file, with a progress bar, and checks
/// the MD5 before giving the file its name.
fn download(url: &str, dir: &Path, archive: &Path) -> Result<(), Cifar10Error> {
    let failed = |message: String| Cifar10Error::Download {
        url: url.to_string(),
        dir: dir.to_path_buf(),
        message,
    };
    let response = ureq::get(url).call().map_err(|e| failed(e.to_string()))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(ARCHIVE_BYTES);
    let bar = indicatif::ProgressBar::new(total).with_message(format!("downloading {url}"));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg}\n{wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    let part = archive.with_extension("gz.part");
    let mut file = File::create(&part).map_err(|e| Cifar10Error::io(&part, e))?;
    let mut body = response
        .into_body()
        .into_with_config()
        .limit(u64::MAX)
        .reader();
    let mut md5 = md5::Md5::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = body.read(&mut buffer).map_err(|e| failed(e.to_string()))?;
        if read == 0 {
            break;
        }
        md5.update(&buffer[..read]);
        file.write_all(&buffer[..read])
            .map_err(|e| Cifar10Error::io(&part, e))?;
        bar.inc(read as u64);
    }
    file.sync_all().map_err(|e| Cifar10Error::io(&part, e))?;
    bar.finish();
    let found = hex(&md5.finalize());
    if found != ARCHIVE_MD5 {
        return Err(Cifar10Error::Checksum {
            path: part,
            algorithm: "MD5",
            expected: ARCHIVE_MD5.to_string(),
            found,
        });
    }
    fs::rename(&part, archive).map_err(|e| Cifar10Error::io(archive, e))
}

/// Extracts the six batch files of `archive` into `dir/cifar-10-batches-bin`, checking each
/// against its published SHA-256, through a temporary folder renamed at the end. Returns
/// the folder.
pub fn extract(archive: &Path, dir: &Path) -> Result<PathBuf, Cifar10Error> {
    let target = dir.join(BATCHES_DIR);
    let staging = dir.join(format!("{BATCHES_DIR}.partial-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| Cifar10Error::io(&staging, e))?;
    }
    fs::create_dir_all(&staging).map_err(|e| Cifar10Error::io(&staging, e))?;
    let extracted = extract_into(archive, &staging);
    if extracted.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    extracted?;
    fs::rename(&staging, &target).map_err(|e| Cifar10Error::io(&target, e))?;
    Ok(target)
}

fn extract_into(archive: &Path, staging: &Path) -> Result<(), Cifar10Error> {
    let mut result = Ok(());
    for_each_archive_file(archive, |name, bytes| {
        if result.is_err() {
            return;
        }
        if let Some((_, expected)) = FILE_SHA256.iter().find(|(file, _)| *file == name) {
            let path = staging.join(name);
            let found = hex(&Sha256::digest(&bytes));
            result = if found != *expected {
                Err(Cifar10Error::Checksum {
                    path: archive.join(BATCHES_DIR).join(name),
                    algorithm: "SHA-256",
                    expected: expected.to_string(),
                    found,
                })
            } else {
                fs::write(&path, &bytes).map_err(|e| Cifar10Error::io(&path, e))
            };
        } else if name == "batches.meta.txt" {
            let path = staging.join(name);
            result = fs::write(&path, &bytes).map_err(|e| Cifar10Error::io(&path, e));
        }
    })?;
    result?;
    match FILE_SHA256
        .iter()
        .find(|(name, _)| !staging.join(name).is_file())
    {
        Some((missing, _)) => Err(Cifar10Error::Archive {
            path: archive.to_path_buf(),
            message: format!("it has no {BATCHES_DIR}/{missing}"),
        }),
        None => Ok(()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
