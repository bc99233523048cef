//! Guest memory as the frontend's memory table maps it, and a ring over it.

use vhost_user_backend::VringRwLock;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the frontend's memory table maps it.
pub(super) type Mem = GuestMemoryMmap<super::shm::Owner>;
/// Guest memory, replaceable as the frontend changes its table.
pub(super) type Gm = GuestMemoryAtomic<Mem>;
/// A ring's state, shared by the message handler and the queue's worker.
pub(super) type Vring = VringRwLock<Gm>;
