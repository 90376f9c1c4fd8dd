//! The Lua scripts that make each state change of a task atomic in Redis (one script runs at a
//! time on the server, so a check and its write cannot interleave with another node's). Each
//! lives in `scripts/NAME.lua`, its keys and arguments named at its top.

use redis::Script;
use std::sync::LazyLock;

macro_rules! script {
    ($(#[$doc:meta])* $name:ident, $file:literal) => {
        $(#[$doc])*
        pub static $name: LazyLock<Script> =
            LazyLock::new(|| Script::new(include_str!(concat!("scripts/", $file))));
    };
}

script!(
    /// Admits a task within the cluster-wide bound.
    ADMIT, "admit.lua"
);
script!(
    /// Queues a created task's input on its model's stream, once.
    ENQUEUE, "enqueue.lua"
);
script!(
    /// A worker starts (or takes over) a task it read from the stream.
    START, "start.lua"
);
script!(
    /// A running task's step; answers go on, cancel asked, or lost.
    PROGRESS, "progress.lua"
);
script!(
    /// A worker's heartbeat on its running task's stream entry.
    KEEP, "keep.lua"
);
script!(
    /// A compare-and-set change of a task's status and record.
    END, "end.lua"
);
script!(
    /// Opens a PUT ticket within the cluster-wide and per-key bounds.
    TICKET, "ticket.lua"
);
script!(
    /// Takes a PUT ticket (single use).
    TAKE_TICKET, "take_ticket.lua"
);
script!(
    /// Accounts for an upload within the per-key and cluster quotas.
    UPLOAD_QUOTA, "upload_quota.lua"
);
