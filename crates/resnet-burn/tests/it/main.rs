//! resnet-burn's tests: one binary, one module per concern.
//!
//! Checks that depend on the backend are written once as `fn check(device: &Device)` and
//! instantiated for every device compiled in by [`device_tests!`].

#[macro_use]
mod support;
mod model;
mod mutations;
mod precision;
mod seeded;
mod torchvision;
