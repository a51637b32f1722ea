//! The node's one Prometheus endpoint: every served layer's series (labels `layer`, `device`,
//! `index_digest`) plus node totals, encoded by the `prometheus` crate (text format 0.0.4).

use std::sync::Arc;

use prometheus::proto::{MetricFamily, MetricType};

use super::daemon::Node;
use super::events::kind;
use crate::fetch::metrics::{counter, family, gauge, layer_families, render, serve_http};

/// The node's metric families now.
pub fn families(node: &Node) -> Vec<MetricFamily> {
    let layers: Vec<_> = node
        .layer_metrics()
        .into_iter()
        .map(|(device, layer, digest, m)| {
            (
                vec![
                    ("layer", layer),
                    ("device", device),
                    ("index_digest", digest),
                ],
                m,
            )
        })
        .collect();
    let mut out = layer_families(&layers);
    let gauges: [(&str, &str, f64); 6] = [
        (
            "lazyblk_node_layers",
            "Layers served by this node daemon.",
            layers.len() as f64,
        ),
        (
            "lazyblk_node_layers_pending",
            "Devices waiting to be resumed (see lazyblk ls).",
            node.pending_count() as f64,
        ),
        (
            "lazyblk_node_memory_cache_bytes",
            "Decoded chunk bytes held in the node's memory cache.",
            node.memory().bytes() as f64,
        ),
        (
            "lazyblk_node_memory_budget_bytes",
            "The node's memory budget for decoded chunks.",
            node.memory().capacity() as f64,
        ),
        (
            "lazyblk_node_disk_cache_bytes",
            "Bytes in the node's chunk cache on disk.",
            node.disk().map(|d| d.total_bytes()).unwrap_or(0) as f64,
        ),
        (
            "lazyblk_node_registry_sessions",
            "Registry sessions (one per repository) open.",
            node.sessions() as f64,
        ),
    ];
    for (name, help, v) in gauges {
        out.push(family(name, help, MetricType::GAUGE, vec![gauge(&[], v)]));
    }
    out.push(family(
        "lazyblk_node_events_total",
        "Events of this daemon by kind (failed reads, recoveries, ...).",
        MetricType::COUNTER,
        [
            kind::ATTACHED,
            kind::DETACHED,
            kind::READ_ERROR,
            kind::RECOVERED,
            kind::ROLLED_BACK,
            kind::RECOVERY_FAILED,
            kind::FILL_COMPLETE,
            kind::FILL_FAILED,
            kind::VERIFIED,
            kind::VERIFY_FAILED,
        ]
        .iter()
        .map(|k| counter(&[("kind", k.to_string())], node.events().total(k)))
        .collect(),
    ));
    out
}

/// Serves `GET /metrics` for `node` on `listener`.
pub async fn serve(node: Node, listener: tokio::net::TcpListener) {
    serve_http(listener, Arc::new(move || render(&families(&node)))).await
}
