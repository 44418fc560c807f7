//! cifar10-burn's tests: one binary, one module per concern.

mod cifar10;
mod files;
