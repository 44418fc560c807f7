//! CIFAR-10 batch files through `cifar10_burn::format::parse_batch`.
#![no_main]

use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (mut labels, mut images) = (Vec::new(), Vec::new());
    let _ = cifar10_burn::format::parse_batch(data, Path::new("fuzz.bin"), &mut labels, &mut images);
});
