//! `--features mpi`: `mpirun -np N vit train ...` trains on N processes (ranks), each on its
//! share of every global batch, the gradients averaged with MPI all-reduce before each
//! optimizer step (see `vitrs::train::dist`). Started without `mpirun`, or by it with one
//! rank, `vit train` runs as it does without the feature.
//!
//! The gradient buckets are summed with non-blocking `MPI_Iallreduce`, started as the backward
//! finishes each bucket and waited for after it; `MPI_Test` on the ones in flight each time a
//! new one starts lets the library progress them between the blocks' backward passes.

use anyhow::{bail, Result};
use std::cell::RefCell;

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::ffi;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{AsRaw, Communicator, CommunicatorCollectives, Equivalence};
use mpi::Threading;
use vitrs::train::dist::{uncovered, Collective};

/// One bucket's sum in flight: MPI reads `send` and writes `recv` until `request` completes,
/// so neither is touched (or freed: the heap buffers do not move with the struct) before.
struct InFlight {
    offset: usize,
    send: Vec<f32>,
    recv: Vec<f32>,
    request: ffi::MPI_Request,
    done: bool,
}

/// The MPI world, alive (MPI initialised) as long as this is.
pub(crate) struct Mpi {
    world: SimpleCommunicator,
    _universe: Universe,
    /// The all-reduce's send buffer, kept between steps.
    send: RefCell<Vec<f32>>,
    /// Bucket sums started and not yet finished.
    in_flight: RefCell<Vec<InFlight>>,
    /// Buffers of finished buckets, reused by the next step's.
    spare: RefCell<Vec<Vec<f32>>>,
}

impl Mpi {
    fn buffer(&self, len: usize) -> Vec<f32> {
        let mut b = self.spare.borrow_mut().pop().unwrap_or_default();
        b.clear();
        b.resize(len, 0.0);
        b
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // Never free a buffer MPI may still use (only reached if a step was abandoned).
        for f in self.in_flight.get_mut().iter_mut().filter(|f| !f.done) {
            // SAFETY: an active request of this communicator, waited for once.
            unsafe { ffi::MPI_Wait(&mut f.request, ffi::RSMPI_STATUS_IGNORE) };
        }
    }
}

// MPI is initialised `Funneled`: only the thread that initialised it makes MPI calls. `vit`
// keeps the trainer, and with it this communicator, on the main thread; the kernels' worker
// threads never see it.
unsafe impl Send for Mpi {}

/// Initialises MPI; `None` when this process is the only rank.
pub(crate) fn init() -> Result<Option<Mpi>> {
    let Some((universe, level)) = mpi::initialize_with_threading(Threading::Funneled) else {
        bail!("MPI could not be initialised (was it initialised twice?)");
    };
    if level < Threading::Funneled {
        bail!("this MPI library gives thread level {level:?}; vit needs Funneled");
    }
    let world = universe.world();
    if world.size() < 2 {
        return Ok(None);
    }
    Ok(Some(Mpi {
        world,
        _universe: universe,
        send: Default::default(),
        in_flight: Default::default(),
        spare: Default::default(),
    }))
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) {
        let mut send = self.send.borrow_mut();
        send.clear();
        send.extend_from_slice(buf);
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
    }

    fn start_sum(&self, offset: usize, data: &[f32]) {
        let mut flight = InFlight {
            offset,
            send: self.buffer(0),
            recv: self.buffer(data.len()),
            request: unsafe { ffi::RSMPI_REQUEST_NULL },
            done: false,
        };
        flight.send.extend_from_slice(data);
        // SAFETY: both buffers hold `data.len()` f32s and live in `in_flight` (their heap
        // storage unmoved) until the request is completed by MPI_Test or MPI_Wait.
        unsafe {
            ffi::MPI_Iallreduce(
                flight.send.as_ptr().cast(),
                flight.recv.as_mut_ptr().cast(),
                data.len() as i32,
                f32::equivalent_datatype().as_raw(),
                SystemOperation::sum().as_raw(),
                self.world.as_raw(),
                &mut flight.request,
            );
        }
        let mut in_flight = self.in_flight.borrow_mut();
        in_flight.push(flight);
        // Let the library move the earlier ones along.
        for f in in_flight.iter_mut().filter(|f| !f.done) {
            let mut flag = 0;
            // SAFETY: an active request; on completion MPI sets it to MPI_REQUEST_NULL.
            unsafe { ffi::MPI_Test(&mut f.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            f.done = flag != 0;
        }
    }

    fn finish_sums(&self, grads: &mut [f32]) {
        let started = std::mem::take(&mut *self.in_flight.borrow_mut());
        let mut ranges = Vec::with_capacity(started.len());
        for mut f in started {
            if !f.done {
                // SAFETY: an active request, waited for once.
                unsafe { ffi::MPI_Wait(&mut f.request, ffi::RSMPI_STATUS_IGNORE) };
            }
            let r = f.offset..f.offset + f.recv.len();
            grads[r.clone()].copy_from_slice(&f.recv);
            ranges.push(r);
            self.spare.borrow_mut().extend([f.send, f.recv]);
        }
        for gap in uncovered(grads.len(), &ranges) {
            self.all_reduce_sum(&mut grads[gap]);
        }
    }
}
