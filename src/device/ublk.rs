//! The ublk backend: `/dev/ublkbN` served through `ublk_drv` with libublk.
//!
//! Threads and wake-ups:
//! - libublk runs one thread per hardware queue. Each runs a single-threaded executor with one task per
//!   tag (FETCH → handle → COMMIT_AND_FETCH) plus one task that keeps a read of an eventfd armed in
//!   the queue's io_uring.
//! - A read is handed to the tokio runtime that owns the fetch engine; the tag's task awaits a
//!   [`Completion`]. When tokio finishes it stores the result, wakes the task and writes the eventfd;
//!   the eventfd's CQE ends the queue thread's `io_uring_enter`, and the executor runs the woken task,
//!   which copies the bytes into the tag's buffer and commits. A queue thread never blocks on the
//!   network, so one slow chunk does not hold up the other tags.
//!
//! Recovery: devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE` when the
//! driver offers them. If the server dies the kernel quiesces the device and keeps its requests; a new
//! server ([`UblkDevice::recover`]) starts user recovery, serves the queues again and the kernel
//! reissues what was in flight. Queue threads live in a private mount namespace (see
//! [`private_mount_namespace`]).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags, UblkUringData};

use crate::fetch::{BlockSource, ReadError};

/// Queue geometry of a ublk device.
#[derive(Debug, Clone, Copy)]
pub struct UblkOptions {
    /// Hardware queues (one serving thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes (the block layer splits bigger ones).
    pub max_io_bytes: u32,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            queues: 1,
            depth: 64,
            max_io_bytes: 512 << 10,
        }
    }
}

/// What the running `ublk_drv` supports, from `UBLK_U_CMD_GET_FEATURES`.
#[derive(Debug, Clone, Copy)]
pub struct UblkFeatures {
    /// The raw feature mask (0 when the driver predates GET_FEATURES).
    pub mask: u64,
}

impl UblkFeatures {
    /// Asks the driver.
    pub fn probe() -> UblkFeatures {
        UblkFeatures {
            mask: UblkCtrl::get_features().unwrap_or(0),
        }
    }

    /// Whether a killed server's device is kept quiesced and its in-flight reads replayed.
    pub fn recovery_with_reissue(&self) -> bool {
        let need = (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE)
            as u64;
        self.mask & need == need
    }
}

/// libublk keeps its control io_uring per thread; every thread that sends control commands needs one.
fn ensure_ctrl_ring() -> io::Result<()> {
    libublk::ctrl::ublk_init_ctrl_task_ring(|ring| {
        if ring.is_none() {
            *ring = Some(
                io_uring::IoUring::<io_uring::squeue::Entry128>::builder()
                    .build(16)
                    .map_err(UblkError::IOError)?,
            );
        }
        Ok(())
    })
    .map_err(|e| ublk_err("control ring", e))
}

fn ublk_err(what: &str, e: UblkError) -> io::Error {
    io::Error::other(format!("ublk: {what}: {e}"))
}

/// A served `/dev/ublkbN`.
pub struct UblkDevice {
    ctrl: Arc<UblkCtrl>,
    id: u32,
    server: Option<std::thread::JoinHandle<()>>,
}

impl UblkDevice {
    /// Creates a read-only ublk device backed by `source` and starts serving it.
    /// With `id`, that device number is asked for (the driver refuses one in use).
    pub fn create(
        source: Arc<dyn BlockSource>,
        rt: &tokio::runtime::Handle,
        opts: UblkOptions,
        id: Option<u32>,
    ) -> io::Result<UblkDevice> {
        let features = UblkFeatures::probe();
        let recoverable = features.recovery_with_reissue();
        let ctrl_flags = if recoverable {
            (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64
        } else {
            tracing::warn!(
                features = format_args!("{:#x}", features.mask),
                "ublk_drv lacks USER_RECOVERY_REISSUE: a crashed server loses its device"
            );
            0
        };
        let ctrl = UblkCtrlBuilder::default()
            .name("lazyblk")
            .id(id.map_or(-1, |i| i as i32))
            .nr_queues(opts.queues)
            .depth(opts.depth)
            .io_buf_bytes(opts.max_io_bytes)
            .ctrl_flags(ctrl_flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build()
            .map_err(|e| ublk_err("adding a device through /dev/ublk-control", e))?;
        Self::serve(Arc::new(ctrl), source, rt)
    }

    /// Takes over device `id`, whose server died: waits for the kernel to quiesce it, starts user
    /// recovery and serves it again; the kernel then reissues the reads it was holding.
    pub fn recover(
        id: u32,
        source: Arc<dyn BlockSource>,
        rt: &tokio::runtime::Handle,
    ) -> io::Result<UblkDevice> {
        let probe = UblkCtrl::new_simple(id as i32)
            .map_err(|e| ublk_err(&format!("device {id} is not there"), e))?;
        let info = probe.dev_info();
        let flags = info.flags;
        if flags & libublk::sys::UBLK_F_USER_RECOVERY as u64 == 0 {
            return Err(io::Error::other(format!(
                "ublk device {id} was created without USER_RECOVERY and cannot be taken over"
            )));
        }
        let dev_size = probe
            .get_target_from_json()
            .map(|t| t.dev_size)
            .unwrap_or(0);
        if dev_size != 0 && dev_size != source.size() {
            return Err(io::Error::other(format!(
                "ublk device {id} is {dev_size} bytes but the source is {}",
                source.size()
            )));
        }
        // Waits (up to 30 s, in libublk) for the kernel's monitor to quiesce the dead server's device.
        probe
            .start_user_recover()
            .map_err(|e| ublk_err(&format!("START_USER_RECOVERY on device {id}"), e))?;
        drop(probe);
        let ctrl = UblkCtrlBuilder::default()
            .name("lazyblk")
            .id(id as i32)
            .nr_queues(info.nr_hw_queues)
            .depth(info.queue_depth)
            .io_buf_bytes(info.max_io_buf_bytes)
            .ctrl_flags(flags)
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build()
            .map_err(|e| ublk_err(&format!("reopening device {id}"), e))?;
        Self::serve(Arc::new(ctrl), source, rt)
    }

    fn serve(
        ctrl: Arc<UblkCtrl>,
        source: Arc<dyn BlockSource>,
        rt: &tokio::runtime::Handle,
    ) -> io::Result<UblkDevice> {
        let id = ctrl.dev_info().dev_id;
        let (started_tx, started_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let size = source.size();
        let rt = rt.clone();
        let c = ctrl.clone();
        let failed_tx = started_tx.clone();
        let server = std::thread::Builder::new()
            .name(format!("ublk{id}-ctrl"))
            .spawn(move || {
                if let Err(e) = ensure_ctrl_ring() {
                    let _ = failed_tx.send(Err(e));
                    return;
                }
                let tgt_init = move |dev: &mut UblkDev| {
                    dev.set_default_params(size);
                    // Read-only, no volatile cache (nothing to flush), 4 KiB physical blocks.
                    dev.tgt.params.basic.attrs = libublk::sys::UBLK_ATTR_READ_ONLY;
                    Ok(())
                };
                let q_fn = move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &source, &rt);
                let ready = move |_: &UblkCtrl| {
                    let _ = started_tx.send(Ok(()));
                };
                if let Err(e) = c.run_target(tgt_init, q_fn, ready) {
                    let _ = failed_tx.send(Err(ublk_err("starting the device", e)));
                }
            })?;
        let mut dev = UblkDevice {
            ctrl,
            id,
            server: Some(server),
        };
        match started_rx.recv() {
            Ok(Ok(())) => Ok(dev),
            Ok(Err(e)) => {
                dev.join();
                Err(e)
            }
            Err(_) => {
                dev.join();
                Err(io::Error::other(
                    "ublk: the serving thread ended before the device started",
                ))
            }
        }
    }

    /// `/dev/ublkbN`.
    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    fn join(&mut self) {
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }

    /// Stops serving and deletes the device (requests still queued fail with EIO).
    pub fn delete(mut self) -> io::Result<()> {
        ensure_ctrl_ring()?;
        let r = self
            .ctrl
            .kill_dev()
            .map(|_| ())
            .map_err(|e| ublk_err("stopping the device", e));
        self.join();
        // Dropping the last reference of a control that added the device deletes it; one that
        // recovered it deletes it explicitly.
        let r2 = self
            .ctrl
            .del_dev()
            .map(|_| ())
            .map_err(|e| ublk_err("deleting the device", e));
        r.and(r2.or_else(|e| if self.deleted() { Ok(()) } else { Err(e) }))
    }

    fn deleted(&self) -> bool {
        !std::path::Path::new(&format!("/dev/ublkc{}", self.id)).exists()
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if self.server.is_some() && ensure_ctrl_ring().is_ok() {
            let _ = self.ctrl.kill_dev();
            self.join();
        }
    }
}

/// Deletes a ublk device nobody serves: STOP_DEV first (the requests the kernel was holding for a
/// recovery fail with EIO and the disk goes away), then `before_delete` (e.g. detach a mount: DEL_DEV
/// waits until nothing holds the disk), then DEL_DEV.
pub fn delete_orphan(id: u32, before_delete: impl FnOnce()) -> io::Result<()> {
    ensure_ctrl_ring()?;
    let ctrl = UblkCtrl::new_simple(id as i32)
        .map_err(|e| ublk_err(&format!("device {id} is not there"), e))?;
    ctrl.kill_dev()
        .map_err(|e| ublk_err(&format!("stopping device {id}"), e))?;
    before_delete();
    ctrl.del_dev()
        .map(|_| ())
        .map_err(|e| ublk_err(&format!("deleting device {id}"), e))
}

/// Moves the calling thread into its own mount namespace, private from the host's, and detaches
/// every ublk-backed or overlay mount it inherited.
///
/// A ublk server that is the last task of a mount namespace holding a mount of its own device
/// deadlocks on exit: tearing the namespace down unmounts the filesystem, which waits for I/O that
/// only the exiting server could answer. The queue threads therefore run in a namespace of their own
/// that holds no such mount (new host mounts do not propagate into it). `unshare(CLONE_NEWNS)`
/// applies to the calling thread only; the rest of the process, which mounts, stays in the host's.
pub fn private_mount_namespace() -> io::Result<()> {
    // SAFETY: plain syscalls with constant arguments and valid NUL-terminated strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let mut doomed: Vec<String> = super::mountinfo::mounts("/proc/thread-self/mountinfo")
        .into_iter()
        .filter(|m| m.source.starts_with("/dev/ublkb") || m.fstype == "overlay")
        .map(|m| m.mountpoint)
        .collect();
    // Deepest first.
    doomed.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in doomed {
        let Ok(c) = std::ffi::CString::new(m) else {
            continue;
        };
        // SAFETY: `c` is a valid NUL-terminated path; failure only leaves the mount in place.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    Ok(())
}

/// Result slot of one read handed to tokio; the queue thread's task awaits it.
#[derive(Default)]
struct Slot {
    result: Option<Result<Bytes, ReadError>>,
    waker: Option<Waker>,
}

#[derive(Clone, Default)]
struct Completion(Arc<Mutex<Slot>>);

impl Completion {
    fn complete(&self, r: Result<Bytes, ReadError>) {
        let waker = {
            let mut s = self.0.lock().expect("completion lock");
            s.result = Some(r);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Future for Completion {
    type Output = Result<Bytes, ReadError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.lock().expect("completion lock");
        match s.result.take() {
            Some(r) => Poll::Ready(r),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The eventfd tokio writes after completing a read, to wake a queue thread out of io_uring.
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is fresh and owned from here on.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd; EAGAIN (counter full) still
        // leaves it readable, which is all a wake-up needs.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// Serves hardware queue `qid` until the device stops. Runs on a libublk queue thread.
fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    source: &Arc<dyn BlockSource>,
    rt: &tokio::runtime::Handle,
) {
    if let Err(e) = private_mount_namespace() {
        tracing::warn!(error = %e, "ublk queue thread: no private mount namespace");
    }
    let doorbell = match Doorbell::new() {
        Ok(d) => Arc::new(d),
        Err(e) => {
            tracing::error!(error = %e, "ublk queue thread: eventfd");
            return;
        }
    };
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(queue = qid, error = %e, "ublk: cannot set up queue");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in q.tags() {
        let (q, src, rt, bell) = (q.clone(), source.clone(), rt.clone(), doorbell.clone());
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, &src, &rt, &bell).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(queue = qid, tag, error = %e, "ublk tag task failed"),
            }
        }));
    }
    // Keeps a read of the doorbell armed in this queue's ring; its completion is the wake-up.
    let bell = doorbell.clone();
    let listener = exe.spawn(async move {
        // The kernel may still hold this read when the task is dropped at queue shutdown (the ring
        // outlives it until the thread exits): the 8 bytes it writes into must never be freed.
        let buf: &'static mut [u8; 8] = Box::leak(Box::new([0u8; 8]));
        loop {
            let sqe = io_uring::opcode::Read::new(
                io_uring::types::Fd(bell.0.as_raw_fd()),
                buf.as_mut_ptr(),
                8,
            )
            .build();
            let r = libublk::uring_async::ublk_submit_sqe_async(sqe, UblkUringData::Target as u64)
                .await;
            match r {
                Ok(n) if n >= 0 || n == -libc::EAGAIN || n == -libc::EINTR => continue,
                Ok(n) => {
                    tracing::error!(errno = -n, "ublk: doorbell read failed");
                    break;
                }
                Err(_) => break,
            }
        }
    });
    let ex = exe.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while ex.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q, Some(20), run_ops, done).await {
            tracing::error!(queue = qid, error = %e, "ublk queue loop ended");
        }
    }));
    drop(listener);
}

/// One tag: fetch a request, answer it, commit and fetch the next, until the queue goes down.
async fn serve_tag(
    q: &UblkQueue<'_>,
    tag: u16,
    source: &Arc<dyn BlockSource>,
    rt: &tokio::runtime::Handle,
    bell: &Arc<Doorbell>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let (op, start, sectors) = (iod.op_flags & 0xff, iod.start_sector, iod.nr_sectors);
        let res = answer(op, start, sectors, buf.as_mut_slice(), source, rt, bell).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// The result code of one request (bytes read, or a negative errno).
async fn answer(
    op: u32,
    start_sector: u64,
    sectors: u32,
    buf: &mut [u8],
    source: &Arc<dyn BlockSource>,
    rt: &tokio::runtime::Handle,
    bell: &Arc<Doorbell>,
) -> i32 {
    // Sectors in ublk descriptors are 512-byte units whatever the logical block size.
    let offset = start_sector << 9;
    let len = (sectors as usize) << 9;
    match op {
        libublk::sys::UBLK_IO_OP_READ => {
            if len > buf.len()
                || offset
                    .checked_add(len as u64)
                    .is_none_or(|e| e > source.size())
            {
                tracing::error!(offset, len, "ublk: read outside the device");
                return -libc::EINVAL;
            }
            // Cached (or all-zero) data is copied on this thread: no hop to tokio and back.
            if source.read_now_into(offset, &mut buf[..len]) {
                return len as i32;
            }
            let done = Completion::default();
            let (d, src, bell) = (done.clone(), source.clone(), bell.clone());
            rt.spawn(async move {
                d.complete(src.read_at(offset, len).await);
                bell.ring();
            });
            match done.await {
                Ok(bytes) if bytes.len() == len => {
                    buf[..len].copy_from_slice(&bytes);
                    len as i32
                }
                Ok(bytes) => {
                    tracing::error!(offset, len, got = bytes.len(), "ublk: short read");
                    -libc::EIO
                }
                Err(e) => {
                    tracing::error!(offset, len, error = %e, "ublk: read failed, returning EIO");
                    -libc::EIO
                }
            }
        }
        libublk::sys::UBLK_IO_OP_FLUSH => 0,
        libublk::sys::UBLK_IO_OP_WRITE
        | libublk::sys::UBLK_IO_OP_DISCARD
        | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => -libc::EROFS,
        _ => -libc::EOPNOTSUPP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_wakes_and_delivers_from_another_thread() {
        let c = Completion::default();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            c2.complete(Ok(Bytes::from_static(b"abc")));
        });
        let exe = smol::LocalExecutor::new();
        let got = smol::block_on(exe.run(c)).unwrap();
        assert_eq!(&got[..], b"abc");
        t.join().unwrap();
    }
}
