//! Turning published access logs into a [`Trace`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::publish::AccessFile;
use super::{LayerTrace, Trace};

/// Wall-clock ms since the Unix epoch: the clock of [`Window`] and of the access logs.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Which accesses go into a trace, as wall-clock ms since the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Recording start: times in the trace count from here. Accesses before it are kept unless
    /// `only_after_start` (a device attached before recording began, e.g. by the pull).
    pub start_ms: u64,
    /// Accesses after this (readiness plus the grace window) are left out.
    pub end_ms: u64,
    /// Drop accesses before `start_ms`.
    pub only_after_start: bool,
}

/// The published access logs under `run_dir` (`devices/*.access.json`), with the directory's errors.
fn access_logs(
    run_dir: &Path,
) -> std::io::Result<impl Iterator<Item = std::io::Result<std::path::PathBuf>>> {
    let suffix = format!(".{}", super::publish::ACCESS_SUFFIX);
    Ok(std::fs::read_dir(run_dir.join("devices"))?
        .map(|e| e.map(|e| e.path()))
        .filter(move |p| {
            p.as_ref().map_or(true, |p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&suffix))
            })
        }))
}

/// Reads every `devices/*.access.json` under `run_dir` and keeps the accesses inside `window`, per
/// layer (index digest), in first-read order. Layers with no access in the window are left out.
pub fn collect(run_dir: &Path, window: Window) -> std::io::Result<Trace> {
    let mut by_layer: BTreeMap<String, (String, Vec<(u64, u64)>)> = BTreeMap::new();
    for path in access_logs(run_dir)? {
        let path = path?;
        let f: AccessFile = match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "skipping unreadable access log");
                continue;
            }
        };
        let slot = by_layer
            .entry(f.index_digest.clone())
            .or_insert_with(|| (f.source.clone(), Vec::new()));
        for a in &f.accesses {
            let at = f.opened_ms.saturating_add(a.ms);
            if at > window.end_ms || (window.only_after_start && at < window.start_ms) {
                continue;
            }
            slot.1.push((at, a.chunk));
        }
    }
    let mut layers = Vec::new();
    for (index_digest, (source, mut acc)) in by_layer {
        // Stable: same-millisecond reads keep their recorded order.
        acc.sort_by_key(|&(at, _)| at);
        let mut seen = std::collections::HashSet::new();
        let mut lt = LayerTrace {
            index_digest,
            source,
            ..LayerTrace::default()
        };
        for (at, c) in acc {
            if seen.insert(c) {
                lt.chunks.push(c);
                lt.ms.push(at.saturating_sub(window.start_ms));
            }
        }
        if !lt.chunks.is_empty() {
            layers.push(lt);
        }
    }
    // Layers in the order they were first read.
    layers.sort_by_key(|l| l.ms.first().copied().unwrap_or(0));
    Ok(Trace {
        schema_version: 1,
        ready_ms: None,
        layers,
    })
}

/// How many first reads the access logs under `run_dir` hold for the layers (index digests) in
/// `layers`: what [`collect`] would put in a trace of theirs over every time, counted without building
/// it (logs that cannot be read count nothing).
pub fn count_first_reads(run_dir: &Path, layers: &HashSet<String>) -> usize {
    /// An access log's digest and the number of its accesses, which are not decoded.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Counted {
        index_digest: String,
        accesses: Vec<serde::de::IgnoredAny>,
    }
    let Ok(logs) = access_logs(run_dir) else {
        return 0;
    };
    logs.filter_map(|p| serde_json::from_slice::<Counted>(&std::fs::read(p.ok()?).ok()?).ok())
        .filter(|c| layers.contains(&c.index_digest))
        .map(|c| c.accesses.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::engine::ChunkAccess;

    fn write(dir: &Path, dev: &str, digest: &str, opened: u64, acc: &[(u64, u64)]) {
        let f = AccessFile {
            index_digest: digest.into(),
            source: format!("src-{dev}"),
            opened_ms: opened,
            accesses: acc
                .iter()
                .map(|&(chunk, ms)| ChunkAccess { chunk, ms })
                .collect(),
        };
        std::fs::write(
            dir.join(format!("devices/{dev}.access.json")),
            serde_json::to_vec(&f).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn keeps_the_window_per_layer_in_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("devices")).unwrap();
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        write(
            d.path(),
            "loop1",
            &a,
            1000,
            &[(0, 0), (7, 5), (3, 50), (9, 500)],
        );
        write(d.path(), "loop2", &b, 1020, &[(1, 0), (2, 10)]);
        std::fs::write(d.path().join("devices/loop3.access.json"), b"garbage").unwrap();
        let w = Window {
            start_ms: 1010,
            end_ms: 1100,
            only_after_start: false,
        };
        let t = collect(d.path(), w).unwrap();
        assert_eq!(t.layers.len(), 2);
        assert_eq!(t.layers[0].index_digest, a);
        assert_eq!(t.layers[0].chunks, vec![0, 7, 3]); // 9 is after the end
        assert_eq!(t.layers[0].ms, vec![0, 0, 40]);
        assert_eq!(t.layers[1].chunks, vec![1, 2]);
        let t = collect(
            d.path(),
            Window {
                only_after_start: true,
                ..w
            },
        )
        .unwrap();
        let la = t.layers.iter().find(|l| l.index_digest == a).unwrap();
        assert_eq!(la.chunks, vec![3]);
        // The count of the recorder: every first read of the layers asked for, none of the others.
        let only_a = HashSet::from([a.clone()]);
        assert_eq!(count_first_reads(d.path(), &only_a), 4);
        assert_eq!(count_first_reads(d.path(), &HashSet::from([a, b])), 6);
        assert_eq!(count_first_reads(&d.path().join("none"), &only_a), 0);
    }
}
