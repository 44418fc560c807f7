//! `.pth` files (zip + pickle) through `ResNet::load_torchvision_bytes`. Seed it with
//! `crates/resnet-burn/tests/fixtures/*.pth`.
#![no_main]

mod weights;

libfuzzer_sys::fuzz_target!(|data: &[u8]| weights::load(data, "fuzz.pth"));
