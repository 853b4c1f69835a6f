//! `--features mpi`: `mpirun -np N vit train ...` trains on N processes (ranks), each on its
//! share of every global batch, the gradients averaged with MPI all-reduce before each
//! optimizer step (see `vitrs::train::dist`). Started without `mpirun`, or by it with one
//! rank, `vit train` runs as it does without the feature.

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};
use mpi::Threading;
use vitrs::train::dist::Collective;

/// The MPI world, alive (MPI initialised) as long as this is.
pub(crate) struct Mpi {
    world: SimpleCommunicator,
    _universe: Universe,
    /// The all-reduce's send buffer, kept between steps.
    send: std::cell::RefCell<Vec<f32>>,
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
}
