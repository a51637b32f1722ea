//! Which connections a fetch travels on: the *demand* lane (a workload is waiting for it) or the
//! *bulk* lane (background fill, the copy of an original layer).
//!
//! Both lanes reach the same registry with the same TLS settings and credentials, but through
//! separate connection pools, so a demand read never shares a TCP connection (an HTTP/2 connection
//! multiplexes every request of its pool) with megabytes of fill. On one connection a demand
//! response waits behind every fill byte already queued in the sender's socket buffer and on the
//! path: measured on the benchmark's 30 ms / 200 Mbit/s profile, a container's first cold read
//! (4 KiB, ctr's read of `/etc/group`) took 0.38 s behind the fill that had started at attach
//! (docs/benchmarks.md, "What a start waits for"). On their own connection, demand responses only
//! share the path's bandwidth with the fill.
//!
//! The lane is a property of the task doing the fetch (a tokio task-local), so the engine marks
//! whole fill batches once and every fetch under them, however deep, follows.

use std::future::Future;

tokio::task_local! {
    static LANE: Lane;
}

/// A fetch's lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Someone is waiting for these bytes (the default).
    Demand,
    /// Background work that may take as long as the link needs.
    Bulk,
}

/// The lane of the running task ([`Lane::Demand`] unless inside [`bulk`]).
pub fn current() -> Lane {
    LANE.try_with(|l| *l).unwrap_or(Lane::Demand)
}

/// Runs `f` with every fetch it makes on the bulk lane.
pub async fn bulk<F: Future>(f: F) -> F::Output {
    within(Lane::Bulk, f).await
}

/// Runs `f` on `lane` (a spawned task carries its spawner's lane with `within(current(), f)`).
pub async fn within<F: Future>(lane: Lane, f: F) -> F::Output {
    LANE.scope(lane, f).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fetches_are_on_the_demand_lane_unless_marked_bulk() {
        assert_eq!(current(), Lane::Demand);
        assert_eq!(bulk(async { current() }).await, Lane::Bulk);
        // Deeper futures inherit it; it ends with the scope.
        let nested =
            bulk(async { futures::future::join(async { current() }, async { current() }).await })
                .await;
        assert_eq!(nested, (Lane::Bulk, Lane::Bulk));
        assert_eq!(current(), Lane::Demand);
        // A spawned task starts on the demand lane unless it is handed its spawner's.
        let spawned = bulk(async {
            let lane = current();
            let plain = tokio::spawn(async { current() });
            let carried = tokio::spawn(within(lane, async { current() }));
            (plain.await.unwrap(), carried.await.unwrap())
        })
        .await;
        assert_eq!(spawned, (Lane::Demand, Lane::Bulk));
    }
}
