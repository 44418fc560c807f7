//! Integration tests of resnet-burn and cifar10-burn: one binary, one module per concern.
//!
//! Checks that depend on the backend are written once as `fn check(device: &Device)` and
//! instantiated for every device compiled in by [`device_tests!`].

#[macro_use]
mod devices;
mod cifar10;
mod model;
mod torchvision;
mod training;
