//! `lazyblk layer convert|export|inspect`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use lazyblk_image_format::{
    digest_string, parse_digest, ChunkKind, Codec, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT,
};

use crate::blobfile::BlobFile;
use crate::convert::{convert_layer, ConvertOptions};

#[derive(Debug, Subcommand)]
pub enum LayerCommand {
    /// Convert a tar layer (.tar, .tar.gz, .tar.zst; detected by content; `-` for stdin) to a blob.
    Convert(ConvertArgs),
    /// Verify every chunk of a blob and write its raw ext4 image.
    Export(ExportArgs),
    /// Describe a blob: geometry, chunk counts, sizes, index digest.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Input layer, or `-` for stdin.
    input: String,
    /// Output blob.
    #[arg(short, long)]
    output: PathBuf,
    /// Chunk size: a power of two from 4K to 4M (suffixes K and M).
    #[arg(long, default_value = "256K", value_parser = parse_chunk_size)]
    chunk_size: u8,
    /// Chunk compression.
    #[arg(long, default_value = "zstd", value_parser = ["zstd", "none"])]
    codec: String,
    #[command(flatten)]
    level: ZstdLevel,
    /// Compression threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Refuse layers with more tar entries than this (each costs about 0.6 KiB of memory).
    #[arg(long, default_value_t = crate::convert::DEFAULT_MAX_ENTRIES)]
    max_entries: u64,
    /// Largest metadata startup region, bytes (`0` = none): see `lazyblk convert --metadata-region`.
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    metadata_region: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The blob.
    blob: PathBuf,
    /// Output raw image.
    #[arg(short, long)]
    output: PathBuf,
    /// Trusted index digest (`sha256:...`, from the OCI descriptor); default: the footer's.
    #[arg(long)]
    index_digest: Option<String>,
    /// Decoding threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The blob.
    blob: PathBuf,
    /// Trusted index digest (`sha256:...`); default: the footer's.
    #[arg(long)]
    index_digest: Option<String>,
    /// Also read, verify and decompress every chunk on one thread, and report the throughput.
    #[arg(long)]
    verify: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Parses `256K`, `1M` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.strip_suffix(['K', 'k']) {
        Some(n) => (n, 1u64 << 10),
        None => match s.strip_suffix(['M', 'm']) {
            Some(n) => (n, 1 << 20),
            None => (s, 1),
        },
    };
    num.parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (like 256K or 1M)"))
}

/// Parses `256K`-style chunk sizes into a shift.
pub fn parse_chunk_size(s: &str) -> Result<u8, String> {
    let bytes = parse_size(s)?;
    if !bytes.is_power_of_two() {
        return Err(format!("chunk size {bytes} is not a power of two"));
    }
    let shift = bytes.trailing_zeros() as u8;
    if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&shift) {
        return Err(format!("chunk size {bytes} is outside 4K..4M"));
    }
    Ok(shift)
}

fn threads(t: Option<usize>) -> usize {
    t.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
    .max(1)
}

/// `--level`, the zstd level of converted chunks (`layer convert` and `convert`).
#[derive(Debug, Args)]
pub struct ZstdLevel {
    /// zstd level of the chunks (1..19): higher sends fewer bytes to every node on every cold start
    /// and costs conversion CPU once (docs/benchmarks.md, "Compression level"); 3 converts ~10x faster.
    #[arg(long, default_value_t = lazyblk_image_format::DEFAULT_ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    level: i32,
}

impl ZstdLevel {
    /// The codec this level names.
    pub fn codec(&self) -> Codec {
        Codec::Zstd { level: self.level }
    }
}

pub fn run(cmd: LayerCommand) -> Result<()> {
    match cmd {
        LayerCommand::Convert(a) => convert(a),
        LayerCommand::Export(a) => export(a),
        LayerCommand::Inspect(a) => inspect(a),
    }
}

fn convert(a: ConvertArgs) -> Result<()> {
    let opts = ConvertOptions {
        chunk_shift: a.chunk_size,
        codec: if a.codec == "none" {
            Codec::None
        } else {
            a.level.codec()
        },
        threads: threads(a.threads),
        progress: !a.json,
        max_entries: a.max_entries,
        metadata_region_bytes: a.metadata_region,
    };
    let summary = if a.input == "-" {
        convert_layer(std::io::stdin(), None, &a.output, &opts)
    } else {
        let f = File::open(&a.input).with_context(|| format!("opening {}", a.input))?;
        let len = f.metadata().ok().map(|m| m.len());
        convert_layer(f, len, &a.output, &opts)
    }
    .with_context(|| format!("converting {}", a.input))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let b = &summary.blob;
        println!("{} -> {}", a.input, a.output.display());
        println!(
            "  layer     {} ({} bytes, {:?}), diff id {}",
            summary.input.digest,
            summary.input.bytes,
            summary.input.compression,
            summary.input.diff_id
        );
        println!(
            "  ext4      {} bytes, {} files, {} dirs, {} symlinks, {} special, {} inodes",
            summary.ext4.image_size,
            summary.ext4.files,
            summary.ext4.dirs,
            summary.ext4.symlinks,
            summary.ext4.special,
            summary.ext4.inodes_used
        );
        println!(
            "  blob      {} ({} bytes, {:.1}% of the layer)",
            b.digest,
            b.size,
            100.0 * b.size as f64 / summary.input.bytes.max(1) as f64
        );
        println!(
            "  chunks    {} x {} bytes, {} zero",
            b.chunk_count, b.chunk_size, b.zero_chunks
        );
        println!(
            "  index     {} bytes at {}, {}",
            b.index_length, b.index_offset, b.index_digest
        );
        println!("  time      {:.2}s", summary.seconds);
    }
    Ok(())
}

fn trusted(d: &Option<String>) -> Result<Option<[u8; 32]>> {
    d.as_deref()
        .map(parse_digest)
        .transpose()
        .context("--index-digest")
}

fn export(a: ExportArgs) -> Result<()> {
    let trusted = trusted(&a.index_digest)?;
    let blob = BlobFile::open(&a.blob, trusted.as_ref())?;
    let started = Instant::now();
    let dir = match a.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".lazyblk-export-")
        .tempfile_in(&dir)?;
    let idx = blob.index();
    tmp.as_file().set_len(idx.image_size())?;
    let n = idx.chunk_count();
    let t = threads(a.threads) as u64;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..t)
            .map(|k| {
                let (blob, out) = (&blob, tmp.as_file());
                s.spawn(move || -> Result<()> {
                    let mut scratch = Vec::new();
                    let mut buf = Vec::new();
                    for c in (k..n).step_by(t as usize) {
                        if idx.entry(c).kind == ChunkKind::Zero {
                            continue;
                        }
                        buf.resize(idx.chunk_len(c) as usize, 0);
                        blob.read_chunk(c, &mut scratch, &mut buf)?;
                        out.write_all_at(&buf, idx.chunk_offset(c))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("export thread panicked"))??;
        }
        Ok(())
    })?;
    tmp.as_file().sync_all()?;
    tmp.persist(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "exported {} bytes ({} chunks verified) to {} in {:.2}s",
        idx.image_size(),
        n,
        a.output.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[derive(serde::Serialize)]
struct Inspection {
    blob_size: u64,
    image_size: u64,
    chunk_size: u64,
    chunk_count: u64,
    zero_chunks: u64,
    raw_chunks: u64,
    zstd_chunks: u64,
    stored_bytes: u64,
    index_offset: u64,
    index_length: u64,
    index_digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    verify: Option<VerifyResult>,
}

#[derive(serde::Serialize)]
struct VerifyResult {
    chunks: u64,
    decoded_bytes: u64,
    stored_bytes: u64,
    seconds: f64,
    decoded_mb_per_s: f64,
}

fn inspect(a: InspectArgs) -> Result<()> {
    let trusted = trusted(&a.index_digest)?;
    let blob = BlobFile::open(&a.blob, trusted.as_ref())?;
    let idx = blob.index();
    let count = |k| idx.entries().iter().filter(|e| e.kind == k).count() as u64;
    let mut ins = Inspection {
        blob_size: blob.size(),
        image_size: idx.image_size(),
        chunk_size: idx.chunk_size(),
        chunk_count: idx.chunk_count(),
        zero_chunks: count(ChunkKind::Zero),
        raw_chunks: count(ChunkKind::Raw),
        zstd_chunks: count(ChunkKind::Zstd),
        stored_bytes: idx.stored_bytes(),
        index_offset: blob.footer().index_offset,
        index_length: blob.footer().index_length,
        index_digest: digest_string(&blob.footer().index_digest),
        verify: None,
    };
    if a.verify {
        // Load the stored bytes first so the timing measures verification + decompression, not disk.
        let mut stored = Vec::new();
        let mut spans = Vec::new();
        for c in 0..idx.chunk_count() {
            let e = idx.entry(c);
            if e.kind == ChunkKind::Zero {
                continue;
            }
            let mut b = vec![0u8; e.stored_len as usize];
            File::open(&a.blob)?.read_exact_at(&mut b, e.offset)?;
            spans.push((c, stored.len(), b.len()));
            stored.extend_from_slice(&b);
        }
        let mut out = vec![0u8; idx.chunk_size() as usize];
        let started = Instant::now();
        let mut decoded = 0u64;
        for &(c, at, len) in &spans {
            let n = idx.chunk_len(c) as usize;
            lazyblk_image_format::decode_chunk(
                c,
                idx.entry(c),
                &stored[at..at + len],
                &mut out[..n],
            )?;
            decoded += n as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        ins.verify = Some(VerifyResult {
            chunks: spans.len() as u64,
            decoded_bytes: decoded,
            stored_bytes: stored.len() as u64,
            seconds: secs,
            decoded_mb_per_s: decoded as f64 / 1e6 / secs.max(1e-9),
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ins)?);
        return Ok(());
    }
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "blob        {} ({} bytes)",
        a.blob.display(),
        ins.blob_size
    )?;
    writeln!(o, "image       {} bytes", ins.image_size)?;
    writeln!(
        o,
        "chunks      {} x {} bytes: {} zero, {} raw, {} zstd",
        ins.chunk_count, ins.chunk_size, ins.zero_chunks, ins.raw_chunks, ins.zstd_chunks
    )?;
    writeln!(o, "stored      {} bytes", ins.stored_bytes)?;
    writeln!(
        o,
        "index       {} bytes at {}, {}",
        ins.index_length, ins.index_offset, ins.index_digest
    )?;
    if let Some(v) = &ins.verify {
        writeln!(
            o,
            "verified    {} chunks, {} bytes in {:.3}s ({:.0} MB/s decoded, 1 thread)",
            v.chunks, v.decoded_bytes, v.seconds, v.decoded_mb_per_s
        )?;
    }
    Ok(())
}
