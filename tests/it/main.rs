//! The examples' training across the crates: one binary.
//!
//! Checks that depend on the backend are written once as `fn check(device: &Device)` and
//! instantiated for every device compiled in by `device_tests!`, shared with resnet-burn's
//! tests (as are their helpers and CIFAR-10's file writers). With the `mpi` feature,
//! `distributed` runs this binary again as two processes under mpirun.

#[path = "../../crates/cifar10-burn/tests/it/files.rs"]
mod cifar_files;
#[path = "../../crates/resnet-burn/tests/it/support.rs"]
#[macro_use]
mod support;
#[cfg(feature = "mpi")]
mod distributed;
mod finetune;
mod images;
mod learner;
mod training;
