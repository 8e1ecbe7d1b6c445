//! NTMobile daemons (`ntm-as`, `ntm-dc`, `ntm-rs`, `ntm-ns`, `ntm-cs`, `ntmd`) and the `ntm` CLI.
//!
//! They arrive with the runtime milestone. The `ntm` binary already exists so that the README's run
//! command has a stable name; today it says what is and is not there yet.

pub use ntm_mio as runtime;
