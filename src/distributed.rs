//! The processes of a run started by `mpirun` (feature `mpi`), as a [`Collective`]:
//! data-parallel training across processes and machines.
//!
//! ```text
//! mpirun -n 2 target/release/examples/cifar10 --distributed mpi --backend flex
//! ```
//!
//! MPI's default error handler ends the job on a failed communication, so the operations
//! below fail only by stopping every process. A process that fails on its own (an unreadable
//! file, a non-finite loss, a panic) stops every other one with [`Mpi::abort`], which
//! `MPI_Abort`s the job after printing which process failed and why: a process never waits
//! forever for one that is gone. Files are replaced atomically, so the last checkpoint stays
//! intact whatever moment the job stops at.

use std::cell::RefCell;
use std::sync::Once;

use anyhow::{Result, anyhow, bail};
use mpi::Threading;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::parallel::Collective;

/// Every process of the MPI job (`MPI_COMM_WORLD`). MPI is finalized when it is dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    /// The copy of the values an all-reduce sends (MPI reads and writes two buffers), kept
    /// between steps rather than allocated for every gradient bucket.
    send: RefCell<Vec<f32>>,
    _universe: Universe,
}

impl Mpi {
    /// Initializes MPI, with only the calling thread making MPI calls (the data-parallel
    /// worker threads never do), and installs a panic hook that stops every process
    /// ([`Mpi::abort`]) after the usual message.
    ///
    /// Fails when MPI was initialized already or cannot give that threading level.
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| anyhow!("MPI was initialized already in this process"))?;
        if threading < Threading::Funneled {
            bail!(
                "the MPI library gives threading level {threading:?}; at least Funneled is needed"
            );
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                stop_every_process(rank, size, "it panicked (message above)");
            }));
        });
        Ok(Self {
            world,
            send: RefCell::default(),
            _universe: universe,
        })
    }

    /// Prints that this process failed and why, and stops every process of the job
    /// (`MPI_Abort`, exit status 1).
    pub fn abort(&self, cause: &str) -> ! {
        stop_every_process(self.rank(), self.size(), cause)
    }
}

/// `values` summed over the processes of `world`, in place, through the buffer `send`.
fn sum_into<T: Equivalence + Copy>(
    world: &SimpleCommunicator,
    send: &mut Vec<T>,
    values: &mut [T],
) {
    send.clear();
    send.extend_from_slice(values);
    world.all_reduce_into(&send[..], values, SystemOperation::sum());
}

fn stop_every_process(rank: usize, size: usize, cause: &str) -> ! {
    eprintln!("process {rank} of {size} failed: {cause}; stopping every process");
    SimpleCommunicator::world().abort(1)
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        sum_into(&self.world, &mut self.send.borrow_mut(), values);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        // A few totals at a time: no buffer worth keeping.
        sum_into(&self.world, &mut Vec::new(), values);
        Ok(())
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        let len = usize::try_from(len).map_err(|_| anyhow!("a broadcast of {len} bytes"))?;
        bytes.resize(len, 0);
        // An empty buffer's address is not one MPI accepts, and there is nothing to send.
        if len > 0 {
            root.broadcast_into(&mut bytes[..]);
        }
        Ok(())
    }
}
