//! `lazyblk convert` and `lazyblk referrers`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lazyblk_image_format::Codec;

use crate::convert::ConvertOptions;
use crate::image::convert::{convert_image, default_work_dir, find_referrers, ImageConvertOptions};
use crate::image::ImageRef;

use super::RegistryArgs;

/// Arguments of `lazyblk convert`.
#[derive(Debug, Args)]
pub struct ConvertImageArgs {
    /// Source image: `host[:port]/repo[:tag|@digest]` or `oci:PATH[:tag]`.
    src: String,
    /// Target for the converted image (new-tag mode); with --referrer, where to push the artifacts
    /// (default: the source repository).
    dst: Option<String>,
    /// Push lazyblk layers as OCI referrer artifacts of the original (left untouched) instead of a new tag.
    #[arg(long)]
    referrer: bool,
    /// A startup trace (`lazyblk trace record`, or one the node recorded) of this conversion: the
    /// traced chunks of each layer go right before its index, as `lazyblk trace relayout` does, so
    /// a node fetches them with the index in one request. One platform (see --platform).
    #[arg(long, conflicts_with = "referrer")]
    trace: Option<PathBuf>,
    #[command(flatten)]
    level: super::layer::ZstdLevel,
    #[command(flatten)]
    job: ImageJobArgs,
}

/// What `lazyblk convert` and `lazyblk index` share.
#[derive(Debug, Args)]
struct ImageJobArgs {
    /// Only this platform (`linux/amd64`); repeatable. Default: every platform.
    #[arg(long = "platform")]
    platforms: Vec<String>,
    /// Layers processed in parallel.
    #[arg(long, default_value_t = 2)]
    parallel_layers: usize,
    /// Chunk size of the disks: same as `layer convert --chunk-size`.
    #[arg(long, default_value = "256K", value_parser = super::layer::parse_chunk_size)]
    chunk_size: u8,
    /// Largest metadata startup region per layer, bytes (`0` = none): the filesystem metadata at the
    /// end of each blob is marked (`startup-offset`) to arrive with the index in one request.
    #[arg(long, default_value = "8M", value_parser = super::layer::parse_size)]
    metadata_region: u64,
    /// Scratch directory for layers in flight (default: under $TMPDIR).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Print a JSON summary.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

impl ImageJobArgs {
    /// The options of an image job in `mode` (index spans, bound form, referrer) whose converted
    /// chunks use `codec`.
    fn options(
        &self,
        codec: Codec,
        referrer: bool,
        index_spans: Option<u64>,
        bound: bool,
    ) -> ImageConvertOptions {
        ImageConvertOptions {
            platforms: self.platforms.clone(),
            referrer,
            layer: ConvertOptions {
                chunk_shift: self.chunk_size,
                codec,
                progress: false,
                metadata_region_bytes: self.metadata_region,
                ..ConvertOptions::default()
            },
            parallel_layers: self.parallel_layers,
            work_dir: self.work_dir.clone().unwrap_or_else(default_work_dir),
            registry: self.registry.options(),
            progress: !self.json,
            index_spans,
            bound,
        }
    }
}

/// Runs `lazyblk convert`.
pub fn convert(a: ConvertImageArgs) -> Result<()> {
    let src = ImageRef::parse(&a.src)?;
    let dst = a.dst.as_deref().map(ImageRef::parse).transpose()?;
    let opts = a.job.options(a.level.codec(), a.referrer, None, false);
    if let Some(t) = &a.trace {
        let trace = crate::trace::Trace::read_file(t)
            .with_context(|| format!("trace file {}", t.display()))?;
        let dst = dst.context("--trace needs a destination image")?;
        return run_convert_relaid(&src, &dst, &trace, &opts, a.job.json);
    }
    run_convert(&src, dst.as_ref(), &opts, a.job.json)
}

fn run_convert_relaid(
    src: &ImageRef,
    dst: &ImageRef,
    trace: &crate::trace::Trace,
    opts: &ImageConvertOptions,
    json: bool,
) -> Result<()> {
    let (s, r) = run_job(
        opts,
        crate::trace::relayout::convert_relaid(src, dst, trace, opts),
    )
    .with_context(|| format!("converting {src} with a trace"))?;
    if json {
        let out = serde_json::json!({ "convert": s, "relayout": r });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    super::trace::print_relaid_layers(&r);
    println!(
        "{src} -> {} {}: {} -> {} bytes, {:.1}s",
        r.target, r.manifest_digest, s.source_bytes, s.target_bytes, s.seconds
    );
    Ok(())
}

/// Runs an image job on its own runtime, then removes its work directory when it is this process's
/// default one (a `--work-dir` the user gave is theirs: only what the job made inside it goes).
fn run_job<T>(
    opts: &ImageConvertOptions,
    job: impl std::future::Future<Output = Result<T, crate::image::ImageError>>,
) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(job);
    if opts.work_dir == default_work_dir() {
        let _ = std::fs::remove_dir_all(&opts.work_dir);
    }
    Ok(res?)
}

fn run_convert(
    src: &ImageRef,
    dst: Option<&ImageRef>,
    opts: &ImageConvertOptions,
    json: bool,
) -> Result<()> {
    let s = run_job(opts, convert_image(src, dst, opts))
        .with_context(|| format!("converting {src}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        for m in &s.manifests {
            println!(
                "{} {} -> {} ({} layers)",
                m.platform.as_deref().unwrap_or("image"),
                m.source_digest,
                m.target_digest,
                m.layers.len()
            );
        }
        println!(
            "{} -> {} [{}]: {} -> {} bytes, {} uploaded, {:.1}s",
            s.source, s.target, s.mode, s.source_bytes, s.target_bytes, s.uploaded_bytes, s.seconds
        );
    }
    Ok(())
}

/// Arguments of `lazyblk index`.
#[derive(Debug, Args)]
pub struct IndexImageArgs {
    /// The image: `host[:port]/repo[:tag|@digest]` or `oci:PATH[:tag]`. It is not changed; the
    /// index artifacts are pushed next to it (Referrers API, or the `sha256-<hex>` tag fallback).
    src: String,
    /// Also push the *bound form* as this tag (same repository): the image's own layer blobs,
    /// annotated with their index, under a config whose diff IDs commit to the disks — immutable,
    /// like a converted image, with no layer data copied.
    dst: Option<String>,
    /// Compressed bytes between inflate checkpoints: smaller spans fetch less per cold read, larger
    /// ones make a smaller index.
    #[arg(long, default_value = "1M", value_parser = parse_span_size)]
    span_size: u64,
    #[command(flatten)]
    job: ImageJobArgs,
}

fn parse_span_size(s: &str) -> Result<u64, String> {
    let v = super::layer::parse_size(s)?;
    let r = crate::original::build::SPAN_SIZE_RANGE;
    if !r.contains(&v) {
        return Err(format!(
            "span size {v} is outside {}K..{}M",
            r.start() >> 10,
            r.end() >> 20
        ));
    }
    Ok(v)
}

/// Runs `lazyblk index`.
pub fn index(a: IndexImageArgs) -> Result<()> {
    let src = ImageRef::parse(&a.src)?;
    let dst = a.dst.as_deref().map(ImageRef::parse).transpose()?;
    // (An index converts no chunk data: its metadata chunks use `INDEX_ZSTD_LEVEL`.)
    let opts = a
        .job
        .options(Codec::default(), true, Some(a.span_size), dst.is_some());
    run_convert(&src, dst.as_ref(), &opts, a.job.json)
}

/// Arguments of `lazyblk referrers`.
#[derive(Debug, Args)]
pub struct ReferrersArgs {
    /// The original image.
    image: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Runs `lazyblk referrers`: lists the lazyblk artifacts of an image.
pub fn referrers(a: ReferrersArgs) -> Result<()> {
    let image = ImageRef::parse(&a.image)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let found = rt.block_on(find_referrers(&image, &a.registry.options()))?;
    if a.json {
        let v: Vec<_> = found
            .iter()
            .map(|(d, p, m)| serde_json::json!({"artifact": d, "platform": p, "subject": m.subject.as_ref().map(|s| &s.digest), "layers": m.layers}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if found.is_empty() {
        println!("no lazyblk artifacts for {image}");
    } else {
        for (d, p, m) in &found {
            println!(
                "{} {} ({} layers)",
                p.as_deref().unwrap_or("image"),
                d,
                m.layers.len()
            );
        }
    }
    Ok(())
}
