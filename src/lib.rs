//! Support code of resnet-burn's examples, benchmarks and integration tests (not
//! published): the CIFAR-10 training loop ([`train`]), fine-tuning on image folders
//! ([`finetune`], [`folder`], torchvision's [`transforms`]), its data-parallel steps
//! ([`parallel`]; across processes over MPI with the `mpi` feature, `distributed`), loss scaling for f16 convolutions ([`scaler`]) and progress lines (a
//! private module), crash-safe files ([`checkpoint`]), strict image decoding ([`mod@image`]), the curves plot
//! ([`plot`]) and the
//! devices the benchmarks measure ([`mod@bench`]).

pub mod bench;
pub mod checkpoint;
pub mod cli;
#[cfg(feature = "mpi")]
pub mod distributed;
pub mod finetune;
pub mod folder;
pub mod image;
pub mod parallel;
pub mod plot;
mod progress;
pub mod scaler;
pub mod train;
pub mod transforms;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
