//! The reference runtime: a mio event loop that drives any `ntm-state` machine over real UDP and
//! TCP sockets, timers, a TUN device and address-change notifications.
//!
//! No protocol logic lives here. The event loop arrives with the runtime milestone; until then the
//! crate only fixes its place in the dependency chain `wire ← state ← mio ← servers`.

pub use ntm_state as state;
