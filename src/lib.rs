//! Support code of resnet-burn's examples, benchmarks and integration tests (not
//! published): the CIFAR-10 training loop ([`train`]) and its data-parallel steps
//! ([`parallel`]), crash-safe files ([`checkpoint`]) and the curves plot ([`plot`]).

pub mod checkpoint;
pub mod parallel;
pub mod plot;
pub mod train;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
