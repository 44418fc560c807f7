//! `.safetensors` files through `ResNet::load_torchvision_bytes`. Seed it with
//! `crates/resnet-burn/tests/fixtures/*.safetensors`.
#![no_main]

mod weights;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Not a zip: the safetensors path (a zip goes to the .pth target).
    if !data.starts_with(b"PK") {
        weights::load(data, "fuzz.safetensors");
    }
});
