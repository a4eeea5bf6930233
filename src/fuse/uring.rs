//! FUSE over io_uring: requests taken from and answered through per-CPU io_uring queues
//! instead of `read`/`write` on `/dev/fuse` (Linux 6.14+, switched on by
//! `/sys/module/fuse/parameters/enable_uring`).
//!
//! Once the INIT exchange has agreed on it, the kernel expects one queue per possible CPU
//! and routes each request to the queue of the CPU its caller runs on. Each queue here
//! is an io_uring instance served by a thread of its own, holding [`depth`] entries:
//! a header buffer and a payload buffer the kernel fills with one request at a time. The
//! thread registers every entry (`FUSE_IO_URING_CMD_REGISTER`); a completion says a
//! request has landed in an entry; the reply goes into the same buffers and the entry goes
//! back with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also waits for the next request.
//! Until every queue holds a registered entry the kernel holds all requests back, so
//! starting fails unless all queues registered.
//!
//! The request is copied out of the ring entry, laid out as a read of `/dev/fuse` returns
//! it, and handed to fuser's [`Dispatcher`], so the filesystem answers it exactly as it
//! answers `/dev/fuse` requests: on the queue thread, or on a pool thread for requests
//! that may wait for the disk (`MAY_WAIT`), so that one held up never holds up its queue.
//! Another thread that replies (those, and reads that wait) writes the reply into the
//! entry and passes the entry back to the queue thread, waking it through an eventfd the
//! ring reads: the queue thread submits every command itself. That keeps
//! the ring to one thread (`IORING_SETUP_SINGLE_ISSUER`, `DEFER_TASKRUN`), and keeps each
//! command owned by a thread that lives as long as the mount (the kernel cancels a
//! thread's commands when the thread exits, and runs the work of handing it the next
//! request in that thread's context).
//!
//! Forgets, interrupts and notifications still use `/dev/fuse`, so fuser's session loop
//! keeps running beside the queues. When the mount goes away the kernel ends every entry
//! with `ENOTCONN` and the queue threads exit.

use super::{DiskFs, MAX_IO};
use crate::blocking_pool::BlockingPool;
use fuser::{Dispatcher, ReplyTarget};
use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::Mutex;
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use zerocopy::IntoBytes;

/// Entries in all queues together: as many requests as can wait for the disk at once, so
/// a queue of reads reaches the disk together. Each entry holds a payload buffer of
/// [`MAX_IO`] that the kernel fills, so this bounds the memory the queues take rather than
/// letting it grow with the number of CPUs.
const ALL_ENTRIES: usize = BlockingPool::THREADS;
/// Entries of a queue at the least, so that a CPU's second request need not wait for its
/// first to be answered.
const MIN_DEPTH: usize = 2;

/// Entries per queue when there are `queues` of them.
pub fn depth(queues: usize) -> usize {
    (ALL_ENTRIES / queues.max(1)).max(MIN_DEPTH)
}

/// Where the kernel lists the CPUs it makes queues for (`num_possible_cpus`).
const POSSIBLE_CPUS: &str = "/sys/devices/system/cpu/possible";

// The kernel's ABI (include/uapi/linux/fuse.h).
const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `struct fuse_uring_req_header`: the `fuse_in_header`/`fuse_out_header` area, the
/// operation's own header, then `struct fuse_uring_ent_in_out`.
const OP_HEADER_OFFSET: usize = 128;
const OP_HEADER_MAX: usize = 128;
const COMMIT_ID_OFFSET: usize = 256 + 8;
const PAYLOAD_SIZE_OFFSET: usize = 256 + 16;
const HEADERS_LEN: usize = 256 + 32;

/// Every request's payload and every reply fit: the kernel asks for no more than the
/// largest read or write, which INIT set to [`MAX_IO`].
const PAYLOAD_LEN: usize = MAX_IO as usize;
/// Each entry's headers and payload, page-aligned.
const HEADERS_ROOM: usize = 4096;
const ENTRY_LEN: usize = HEADERS_ROOM + PAYLOAD_LEN;
/// The longest request: header, the operation's header, payload.
const REQUEST_MAX: usize = IN_HEADER_LEN + OP_HEADER_MAX + PAYLOAD_LEN;

/// The completion of the queue's eventfd read, among the entries' (whose user data is
/// their index).
const WAKE: u64 = u64::MAX;

/// The rings, set up before the INIT exchange, so that the daemon only asks for FUSE over
/// io_uring when it can serve it: once the kernel agreed, requests wait for the queues.
pub struct Queues {
    rings: Vec<IoUring<squeue::Entry128>>,
}

impl Queues {
    /// One ring per CPU the kernel makes a queue for.
    pub fn prepare() -> io::Result<Queues> {
        let list = std::fs::read_to_string(POSSIBLE_CPUS)
            .map_err(|e| io::Error::new(e.kind(), format!("{POSSIBLE_CPUS}: {e}")))?;
        let count = count_cpus(&list).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{POSSIBLE_CPUS}: unexpected contents {:?}", list.trim()),
            )
        })?;
        let entries = depth(count);
        let rings = (0..count)
            // Room for every entry's command and the wake-up read; completions have room
            // for twice that, so they never overflow. Only the queue thread submits and
            // waits: the kernel then runs the work of handing it a request when it waits
            // rather than interrupting it. The thread enabling a disabled ring becomes its
            // one submitter.
            .map(|_| {
                IoUring::builder()
                    .setup_r_disabled()
                    .setup_single_issuer()
                    .setup_defer_taskrun()
                    .build(entries as u32 + 1)
            })
            .collect::<io::Result<_>>()?;
        Ok(Queues { rings })
    }

    /// Starts a thread per queue serving requests of the FUSE connection `device` with
    /// `dispatcher`, and returns the number of queues once every entry is registered with
    /// the kernel. Fails if any queue could not be set up or registered; the kernel then
    /// holds requests back until the mount goes away, so the caller must unmount.
    pub fn start(
        self,
        device: BorrowedFd<'_>,
        dispatcher: Dispatcher<DiskFs>,
    ) -> io::Result<usize> {
        let device = Arc::new(device.try_clone_to_owned()?);
        let dispatcher = Arc::new(dispatcher);
        let waiting = Arc::new(BlockingPool::default());
        let (report, reports) = channel();
        let count = self.rings.len();
        let entries = depth(count);
        for (qid, ring) in self.rings.into_iter().enumerate() {
            let server = QueueServer::new(
                qid,
                ring,
                device.clone(),
                dispatcher.clone(),
                waiting.clone(),
                entries,
            )?;
            let report = report.clone();
            std::thread::Builder::new()
                .name(format!("fuse-uring-{qid}"))
                .spawn(move || server.run(report))?;
        }
        for _ in 0..count {
            reports
                .recv()
                .map_err(|_| io::Error::other("a queue thread ended before registering"))??;
        }
        Ok(count)
    }
}

/// How many CPUs a kernel CPU list (`0-3,8-11`) names.
fn count_cpus(list: &str) -> Option<usize> {
    list.trim().split(',').try_fold(0usize, |count, range| {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        let (first, last) = (first.parse::<usize>().ok()?, last.parse::<usize>().ok()?);
        count.checked_add(last.checked_sub(first)?.checked_add(1)?)
    })
}

/// Where an entry's request is, given what the kernel says of it: the operation's header
/// is what `fuse_in_header.len` counts beyond the header and the payload. `None` for
/// lengths no request has.
fn op_header_len(request_len: u32, payload_len: u32) -> Option<usize> {
    let payload_len = usize::try_from(payload_len).ok()?;
    if payload_len > PAYLOAD_LEN {
        return None;
    }
    usize::try_from(request_len)
        .ok()?
        .checked_sub(IN_HEADER_LEN + payload_len)
        .filter(|&len| len <= OP_HEADER_MAX)
}

/// The 80-byte command area of a ring command: `struct fuse_uring_cmd_req`.
fn command(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut cmd = [0; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    cmd
}

/// Memory the kernel reads and writes besides this process: every entry's headers and
/// payload. It is only ever reached through raw pointers to one entry at a time, by
/// whoever holds that entry: the kernel from a command until its completion, the queue
/// thread from the completion until it dispatched the request, then the one reply.
struct EntryMemory {
    base: NonNull<u8>,
    layout: Layout,
    entries: usize,
}

// SAFETY: the memory is plain bytes; who may touch which entry is the hand-over above,
// ordered by the ring's completions and the commit list's lock.
unsafe impl Send for EntryMemory {}
// SAFETY: as for Send; shared references only hand out pointers.
unsafe impl Sync for EntryMemory {}

impl EntryMemory {
    fn new(entries: usize) -> io::Result<EntryMemory> {
        let layout = Layout::from_size_align(entries * ENTRY_LEN, HEADERS_ROOM)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: the layout's size is not zero. Zeroed pages of an allocation this large
        // come straight from the kernel and take memory only once touched.
        let base = NonNull::new(unsafe { alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(EntryMemory {
            base,
            layout,
            entries,
        })
    }

    fn headers(&self, entry: usize) -> *mut u8 {
        assert!(entry < self.entries);
        // SAFETY: in bounds of the allocation, by the assertion.
        unsafe { self.base.as_ptr().add(entry * ENTRY_LEN) }
    }

    fn payload(&self, entry: usize) -> *mut u8 {
        // SAFETY: in bounds: the payload follows the headers' room inside the entry.
        unsafe { self.headers(entry).add(HEADERS_ROOM) }
    }

    /// The entry's headers, while the caller holds the entry (see the type).
    ///
    /// # Safety
    /// Nobody else may touch this entry's headers while the slice lives.
    // Shared memory handed out one entry at a time, as the type says: exclusive by the
    // caller's promise, not by the borrow.
    #[allow(clippy::mut_from_ref)]
    unsafe fn headers_mut(&self, entry: usize) -> &mut [u8] {
        // SAFETY: in bounds; exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.headers(entry), HEADERS_LEN) }
    }

    /// The entry's payload buffer, as [`EntryMemory::headers_mut`].
    ///
    /// # Safety
    /// Nobody else may touch this entry's payload while the slice lives.
    // Shared memory handed out one entry at a time, as the type says: exclusive by the
    // caller's promise, not by the borrow.
    #[allow(clippy::mut_from_ref)]
    unsafe fn payload_mut(&self, entry: usize) -> &mut [u8] {
        // SAFETY: in bounds; exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.payload(entry), PAYLOAD_LEN) }
    }
}

impl Drop for EntryMemory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout. The memory goes only with the last
        // reference to the queue, after its ring (and with it every command) is closed.
        unsafe { dealloc(self.base.as_ptr(), self.layout) }
    }
}

/// What a queue's thread shares with the threads that reply.
struct Queue {
    memory: EntryMemory,
    /// Entries replied to, for the queue thread to commit.
    replied: Mutex<Replied>,
    /// Written to wake the queue thread while it waits on its ring.
    wake: File,
}

#[derive(Default)]
struct Replied {
    entries: Vec<usize>,
    /// The queue thread waits in the kernel and needs waking.
    waiting: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queue")
    }
}

impl Queue {
    fn new(entries: usize) -> io::Result<Queue> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Queue {
            memory: EntryMemory::new(entries)?,
            replied: Mutex::new(Replied {
                entries: Vec::with_capacity(entries),
                waiting: false,
            }),
            wake,
        })
    }

    fn hand_back(&self, entry: usize) {
        let wake = {
            let mut replied = self.replied.lock();
            replied.entries.push(entry);
            std::mem::take(&mut replied.waiting)
        };
        if wake {
            // Only fails if the counter would overflow, when a wake-up is pending anyway.
            let _ = (&self.wake).write_all(&1u64.to_ne_bytes());
        }
    }
}

/// The reply side of one ring entry, handed to fuser with each request the entry holds.
#[derive(Debug)]
struct EntryReply {
    queue: Arc<Queue>,
    entry: usize,
}

impl EntryReply {
    /// Answers the entry's request with `errno`, for requests fuser never sees.
    fn error(&self, unique: u64, errno: i32) {
        let _ = self.send(&[IoSlice::new(&out_header(unique, errno))]);
    }
}

fn out_header(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut header = [0; OUT_HEADER_LEN];
    header[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&(-errno).to_ne_bytes());
    header[8..].copy_from_slice(&unique.to_ne_bytes());
    header
}

impl ReplyTarget for EntryReply {
    fn send(&self, reply: &[IoSlice<'_>]) -> io::Result<()> {
        let memory = &self.queue.memory;
        // SAFETY: this is the one reply to the entry's request: the queue thread is done
        // with the entry and the kernel gets it back only through the commit below.
        let (headers, payload) = unsafe {
            (
                memory.headers_mut(self.entry),
                memory.payload_mut(self.entry),
            )
        };
        let payload_len: usize = reply.iter().skip(1).map(|part| part.len()).sum();
        let result = match reply.first() {
            Some(header) if header.len() == OUT_HEADER_LEN && payload_len <= PAYLOAD_LEN => {
                headers[..OUT_HEADER_LEN].copy_from_slice(header);
                let mut at = 0;
                for part in &reply[1..] {
                    payload[at..at + part.len()].copy_from_slice(part);
                    at += part.len();
                }
                Ok(())
            }
            // fuser never replies like that; answer with an error rather than never.
            header => {
                let unique = header.map_or(0, |h| read_u64(h, 8));
                headers[..OUT_HEADER_LEN].copy_from_slice(&out_header(unique, libc::EIO));
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a reply of {payload_len} bytes does not fit a ring entry"),
                ))
            }
        };
        let payload_len = if result.is_ok() { payload_len } else { 0 };
        headers[PAYLOAD_SIZE_OFFSET..PAYLOAD_SIZE_OFFSET + 4]
            .copy_from_slice(&(payload_len as u32).to_ne_bytes());
        self.queue.hand_back(self.entry);
        result
    }
}

/// A queue's thread and what only it touches.
struct QueueServer {
    qid: u16,
    ring: IoUring<squeue::Entry128>,
    device: Arc<OwnedFd>,
    queue: Arc<Queue>,
    dispatcher: Arc<Dispatcher<DiskFs>>,
    /// Where requests that may wait for the disk run (see [`MAY_WAIT`]).
    waiting: Arc<BlockingPool>,
    replies: Vec<Arc<EntryReply>>,
    /// The kernel's id of the request each entry holds, for its commit.
    commit_ids: Vec<u64>,
    buffers: Registrations,
    /// The entries being committed, taken from the queue's list.
    committing: Vec<usize>,
    /// Where the request being dispatched is laid out as `/dev/fuse` gives it; `u64` for
    /// the alignment fuser needs.
    request: Vec<u64>,
    /// Where the eventfd read lands.
    wake_count: Box<u64>,
    /// Entries the kernel has not ended yet.
    live: usize,
}

/// The buffers each entry's registration names; the kernel reads them at submission.
struct Registrations(Vec<[libc::iovec; 2]>);

// SAFETY: the iovecs point into the queue's entry memory, which the server holds (through
// its Arc); they are only handed to the kernel, never dereferenced here.
unsafe impl Send for Registrations {}

impl QueueServer {
    fn new(
        qid: usize,
        ring: IoUring<squeue::Entry128>,
        device: Arc<OwnedFd>,
        dispatcher: Arc<Dispatcher<DiskFs>>,
        waiting: Arc<BlockingPool>,
        entries: usize,
    ) -> io::Result<QueueServer> {
        let qid = u16::try_from(qid)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many queues"))?;
        let queue = Arc::new(Queue::new(entries)?);
        let replies = (0..entries)
            .map(|entry| {
                Arc::new(EntryReply {
                    queue: queue.clone(),
                    entry,
                })
            })
            .collect();
        let buffers = Registrations(
            (0..entries)
                .map(|entry| {
                    [
                        libc::iovec {
                            iov_base: queue.memory.headers(entry).cast(),
                            iov_len: HEADERS_ROOM,
                        },
                        libc::iovec {
                            iov_base: queue.memory.payload(entry).cast(),
                            iov_len: PAYLOAD_LEN,
                        },
                    ]
                })
                .collect(),
        );
        Ok(QueueServer {
            qid,
            ring,
            device,
            queue,
            dispatcher,
            waiting,
            replies,
            commit_ids: vec![0; entries],
            buffers,
            committing: Vec::with_capacity(entries),
            request: vec![0; REQUEST_MAX.div_ceil(8)],
            wake_count: Box::new(0),
            live: entries,
        })
    }

    fn device(&self) -> types::Fd {
        types::Fd(self.device.as_raw_fd())
    }

    fn register(&self, entry: usize) -> squeue::Entry128 {
        let sqe = opcode::UringCmd80::new(self.device(), CMD_REGISTER)
            .addr(Some(self.buffers.0[entry].as_ptr() as u64))
            .cmd(command(self.qid, 0))
            .build();
        with_len(sqe, 2).user_data(entry as u64)
    }

    fn commit(&self, entry: usize) -> squeue::Entry128 {
        opcode::UringCmd80::new(self.device(), CMD_COMMIT_AND_FETCH)
            .cmd(command(self.qid, self.commit_ids[entry]))
            .build()
            .user_data(entry as u64)
    }

    fn wake_read(&mut self) -> squeue::Entry128 {
        let target: *mut u64 = &mut *self.wake_count;
        opcode::Read::new(types::Fd(self.queue.wake.as_raw_fd()), target.cast(), 8)
            .build()
            .user_data(WAKE)
            .into()
    }

    fn push(&mut self, sqe: &squeue::Entry128) {
        // SAFETY: every buffer a command names (entry memory, iovecs, the wake counter)
        // lives as long as the ring. The queue has room for every entry's command and the
        // wake-up read, and each has at most one in flight.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        debug_assert!(pushed.is_ok(), "submission queue full");
    }

    fn run(mut self, report: Sender<io::Result<()>>) {
        let mut completions = Vec::with_capacity(self.replies.len() + 1);
        let registered = self
            .register_all(&mut completions)
            .map_err(|e| io::Error::new(e.kind(), format!("registering queue {}: {e}", self.qid)));
        let failed = registered.is_err();
        let _ = report.send(registered);
        if failed {
            return;
        }
        loop {
            self.handle(&mut completions);
            if self.live == 0 {
                return;
            }
            if let Err(e) = self.wait(&mut completions) {
                log::error!("FUSE over io_uring queue {}: {e}", self.qid);
                return;
            }
        }
    }

    /// Makes this thread the ring's one submitter, registers every entry and arms the
    /// wake-up read. Requests may already have arrived in `completions`.
    fn register_all(&mut self, completions: &mut Vec<(u64, i32)>) -> io::Result<()> {
        self.ring.submitter().register_enable_rings()?;
        for entry in 0..self.replies.len() {
            let sqe = self.register(entry);
            self.push(&sqe);
        }
        let sqe = self.wake_read();
        self.push(&sqe);
        self.ring.submit()?;
        completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        // A registration the kernel refuses completes at once, with the error.
        match completions
            .iter()
            .find(|&&(user_data, result)| user_data != WAKE && result < 0)
        {
            Some(&(_, result)) => Err(io::Error::from_raw_os_error(-result)),
            None => Ok(()),
        }
    }

    /// Submits the commits of the entries replied to and waits for completions.
    fn wait(&mut self, completions: &mut Vec<(u64, i32)>) -> io::Result<()> {
        {
            let mut replied = self.queue.replied.lock();
            std::mem::swap(&mut replied.entries, &mut self.committing);
            // Replies from now on must wake the thread.
            replied.waiting = true;
        }
        for i in 0..self.committing.len() {
            let sqe = self.commit(self.committing[i]);
            self.push(&sqe);
        }
        self.committing.clear();
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        // Replies given while the completions are handled are committed before the next
        // wait, without waking anyone.
        self.queue.replied.lock().waiting = false;
        completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        Ok(())
    }

    fn handle(&mut self, completions: &mut Vec<(u64, i32)>) {
        for (user_data, result) in completions.drain(..) {
            match (user_data, result) {
                (WAKE, 0..) => {
                    let sqe = self.wake_read();
                    self.push(&sqe);
                }
                // Cancelled as the ring closes.
                (WAKE, _) => {}
                (entry, 0) => self.serve(entry as usize),
                (entry, errno) => {
                    self.live -= 1;
                    let errno = -errno;
                    if ![libc::ENOTCONN, libc::ECANCELED, libc::ENODEV].contains(&errno) {
                        log::error!(
                            "FUSE over io_uring queue {}, entry {entry}: {}",
                            self.qid,
                            io::Error::from_raw_os_error(errno)
                        );
                    }
                }
            }
        }
    }

    /// Dispatches the request the kernel put in `entry`: here, or on a pool thread if it
    /// may wait for the disk.
    fn serve(&mut self, entry: usize) {
        let reply = self.replies[entry].clone();
        let memory = &self.queue.memory;
        // SAFETY: the completion handed the entry over; it is replied to (and so written
        // again) only once the request has been copied out, after these slices are gone.
        let (headers, payload) = unsafe { (memory.headers_mut(entry), memory.payload_mut(entry)) };
        let request_len = read_u32(headers, 0);
        let opcode = read_u32(headers, 4);
        let unique = read_u64(headers, 8);
        self.commit_ids[entry] = read_u64(headers, COMMIT_ID_OFFSET);
        let payload_len = read_u32(headers, PAYLOAD_SIZE_OFFSET);
        let Some(op_len) = op_header_len(request_len, payload_len) else {
            log::error!(
                "FUSE over io_uring queue {}: request {unique} of {request_len} bytes with \
                 {payload_len} bytes of payload does not fit a ring entry",
                self.qid
            );
            return reply.error(unique, libc::EIO);
        };
        let parts = [
            &headers[..IN_HEADER_LEN],
            &headers[OP_HEADER_OFFSET..OP_HEADER_OFFSET + op_len],
            &payload[..payload_len as usize],
        ];
        if MAY_WAIT.contains(&opcode) {
            let mut request = vec![0u64; (request_len as usize).div_ceil(8)];
            copy_parts(&parts, request.as_mut_bytes());
            let dispatcher = self.dispatcher.clone();
            let qid = self.qid;
            self.waiting.submit(move || {
                dispatch(
                    &dispatcher,
                    &request.as_bytes()[..request_len as usize],
                    reply,
                    qid,
                )
            });
        } else {
            let request = &mut self.request.as_mut_bytes()[..request_len as usize];
            copy_parts(&parts, request);
            dispatch(&self.dispatcher, request, reply, self.qid);
        }
    }
}

/// Requests that may wait for the disk (writes, syncs, discards, allocation maps): they
/// run on a pool thread, so that one of them held up never holds up the other requests
/// of its CPU's queue. Reads see to it themselves (the adapter hands the ones the page
/// cache cannot answer to threads that wait); the rest never wait for the image.
const MAY_WAIT: [u32; 5] = [
    16, // FUSE_WRITE
    20, // FUSE_FSYNC
    25, // FUSE_FLUSH
    43, // FUSE_FALLOCATE
    46, // FUSE_LSEEK
];

/// The native-endian integer at `at` in a kernel structure (0 past the end).
fn read_u32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .map_or(0, |b| u32::from_ne_bytes(b.try_into().unwrap_or_default()))
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap_or_default()))
}

/// Lays `parts` end to end at the start of `into`.
fn copy_parts(parts: &[&[u8]], into: &mut [u8]) {
    let mut at = 0;
    for part in parts {
        into[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
}

/// Hands `request` to fuser; a request it cannot parse still gets an answer.
fn dispatch(dispatcher: &Dispatcher<DiskFs>, request: &[u8], reply: Arc<EntryReply>, qid: u16) {
    if let Err(e) = dispatcher.dispatch(request, reply.clone()) {
        log::error!("FUSE over io_uring queue {qid}: {e}");
        let unique = read_u64(request, 8);
        reply.error(unique, libc::EIO);
    }
}

/// Sets the `len` field of a 128-byte SQE, which FUSE's registration needs (the number of
/// iovecs) and `opcode::UringCmd80` does not offer.
fn with_len(mut sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    // The u32 at byte 24 of `struct io_uring_sqe` (include/uapi/linux/io_uring.h).
    const LEN_OFFSET: usize = 24;
    // SAFETY: `Entry128` is `repr(C)` and begins with the kernel's `struct io_uring_sqe`;
    // the write stays inside it.
    unsafe {
        std::ptr::from_mut(&mut sqe)
            .cast::<u8>()
            .add(LEN_OFFSET)
            .cast::<u32>()
            .write_unaligned(len)
    };
    sqe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_as_the_kernel_counts() {
        assert_eq!(count_cpus("0\n"), Some(1));
        assert_eq!(count_cpus("0-1\n"), Some(2));
        assert_eq!(count_cpus("0-3,8-11"), Some(8));
        for bad in ["", "x", "3-1", "0-", "-1"] {
            assert_eq!(count_cpus(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_queues_share_one_budget_of_entries() {
        assert_eq!(depth(1), ALL_ENTRIES);
        assert_eq!(depth(2) * 2, ALL_ENTRIES);
        assert_eq!(depth(1024), MIN_DEPTH);
    }

    #[test]
    fn requests_split_into_header_operation_and_payload() {
        // A read: the header and fuse_read_in, no payload.
        assert_eq!(op_header_len(80, 0), Some(40));
        // A lookup: no operation header, the name in the payload.
        assert_eq!(op_header_len(40 + 9, 9), Some(0));
        // A write of 1 MiB.
        assert_eq!(op_header_len(80 + MAX_IO, MAX_IO), Some(40));
        // Lengths no request has.
        assert_eq!(op_header_len(39, 0), None);
        assert_eq!(op_header_len(40 + 4, 8), None);
        assert_eq!(op_header_len(40 + 129, 0), None);
        assert_eq!(op_header_len(u32::MAX, MAX_IO + 1), None);
    }

    #[test]
    fn commands_carry_commit_id_and_queue() {
        let cmd = command(3, 0x1122_3344_5566_7788);
        assert_eq!(&cmd[..8], &[0; 8]);
        assert_eq!(cmd[8..16], 0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(cmd[16..18], 3u16.to_ne_bytes());
        assert!(cmd[18..].iter().all(|&b| b == 0));
    }

    fn headers(queue: &Queue, entry: usize) -> Vec<u8> {
        // SAFETY: the test holds every entry.
        unsafe { queue.memory.headers_mut(entry).to_vec() }
    }

    #[test]
    fn replies_fill_the_entry_and_queue_its_commit() {
        let queue = Arc::new(Queue::new(depth(1)).unwrap());
        queue.replied.lock().waiting = true;
        let reply = EntryReply {
            queue: queue.clone(),
            entry: 5,
        };
        let header = out_header(77, 0);
        reply
            .send(&[
                IoSlice::new(&header),
                IoSlice::new(b"abc"),
                IoSlice::new(b"de"),
            ])
            .unwrap();
        let written = headers(&queue, 5);
        assert_eq!(written[..OUT_HEADER_LEN], header);
        assert_eq!(
            written[PAYLOAD_SIZE_OFFSET..PAYLOAD_SIZE_OFFSET + 4],
            5u32.to_ne_bytes()
        );
        // SAFETY: as above.
        assert_eq!(unsafe { &queue.memory.payload_mut(5)[..5] }, b"abcde");
        let replied = queue.replied.lock();
        assert_eq!((&replied.entries[..], replied.waiting), (&[5][..], false));
        // The waiting thread was woken once.
        let mut count = [0; 8];
        std::io::Read::read_exact(&mut &queue.wake, &mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 1);
    }

    #[test]
    fn replies_too_large_for_an_entry_fail_the_request() {
        let queue = Arc::new(Queue::new(depth(1)).unwrap());
        let reply = EntryReply {
            queue: queue.clone(),
            entry: 0,
        };
        let big = vec![0; PAYLOAD_LEN + 1];
        assert!(
            reply
                .send(&[IoSlice::new(&out_header(9, 0)), IoSlice::new(&big)])
                .is_err()
        );
        let written = headers(&queue, 0);
        assert_eq!(written[..OUT_HEADER_LEN], out_header(9, libc::EIO));
        assert_eq!(
            written[PAYLOAD_SIZE_OFFSET..PAYLOAD_SIZE_OFFSET + 4],
            [0; 4]
        );
        assert_eq!(queue.replied.lock().entries, [0]);
    }
}
