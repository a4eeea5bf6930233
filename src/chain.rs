//! Opening an image with its whole chain of parents, whatever their formats.
//!
//! The image asked for is opened through probe and dispatch ([`open_layer`]); while the
//! last image opened describes a parent, the parent is found, checked and opened the same
//! way, in a loop; then each image is handed its parent, from the bottom up.
//!
//! A differencing image names its parent by paths written on the machine that made it,
//! usually Windows ones (`.\base.vhd`, `C:\VMs\base.vhd`, `\\?\C:\VMs\base.vhd`). They are
//! mapped to host paths and tried beside the child first, then as absolute host paths.
//! Each candidate must be a regular file outside `/proc`, `/sys` and `/dev` (checked on the
//! path with symlinks resolved, and again on the opened descriptor, so swapping the file
//! in between gains nothing), must carry a VHD or VHDX signature, must not already be in
//! the chain (a cycle), and must carry the identity the child recorded for its parent.
//! Parents are opened read-only: many children may share one, and any write to a parent
//! silently changes what every child reads. The one exception is a merge
//! ([`OpenOptions::writable_parent`]), which writes into the first parent what its child
//! already shows, with the parent locked against every other user.

use crate::disk::{OpenOptions, VirtualDisk};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::layer::{
    Layer, MetadataBudget, Parent, ParentImage, ParentLink, ParentPath, StoredParentPaths,
};
use crate::open::{open_layer, probe};
use crate::storage::{FileStorage, Storage};
use std::collections::BTreeMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

/// A file of a chain, known by device and inode so that a second path to it (a symlink,
/// a hard link, `..` games) is still recognised.
#[derive(Debug, Clone)]
struct ChainFile {
    dev: u64,
    ino: u64,
    path: PathBuf,
}

/// Where an image being opened sits, for drivers that must find its parent.
#[derive(Debug, Clone, Default)]
pub struct ImageContext {
    /// The image file, symlinks resolved; `None` for an image known only as a storage.
    path: Option<PathBuf>,
    /// Where the parent is, instead of where the image says (images moved apart).
    parent_override: Option<PathBuf>,
    /// The files from the top of the chain down to this image, this image last.
    chain: Vec<ChainFile>,
    budget: MetadataBudget,
    files: ParentFiles,
}

/// Where a chain's parents are read from.
#[derive(Clone, Default)]
enum ParentFiles {
    /// The host's files, with every check that keeps a stored path away from anything but
    /// an image.
    #[default]
    Host,
    /// Storages in memory by path, for fuzzing and tests; each is known by its place in
    /// the sorted list of paths.
    Memory(Arc<BTreeMap<PathBuf, Arc<dyn Storage>>>),
}

impl std::fmt::Debug for ParentFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParentFiles::Host => f.write_str("Host"),
            ParentFiles::Memory(files) => f.debug_list().entries(files.keys()).finish(),
        }
    }
}

/// A parent candidate found and checked, not yet locked.
enum Located {
    File(fs::File),
    Memory(Arc<dyn Storage>),
}

/// `path` with `.` and `..` resolved by name alone, as an in-memory file's key.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl ImageContext {
    /// An image without a file: it can have no parent.
    pub fn detached() -> ImageContext {
        ImageContext::default()
    }

    /// The top image of a chain, opened from `path` (whose attributes are `meta`).
    pub fn top(path: &Path, meta: &Metadata, parent_override: Option<PathBuf>) -> Result<Self> {
        let canonical =
            fs::canonicalize(path).map_err(|e| Error::io("cannot resolve the image path", e))?;
        Ok(ImageContext {
            chain: vec![ChainFile {
                dev: meta.dev(),
                ino: meta.ino(),
                path: canonical.clone(),
            }],
            path: Some(canonical),
            parent_override,
            budget: MetadataBudget::default(),
            files: ParentFiles::Host,
        })
    }

    /// An image known as `path` whose parents are found among `files` by the paths the
    /// images store, with the same rules as on the host (candidates, cycles, formats,
    /// identities, depth, memory), but in memory: for fuzzing and tests.
    pub fn in_memory(path: &Path, files: BTreeMap<PathBuf, Arc<dyn Storage>>) -> ImageContext {
        let files: BTreeMap<PathBuf, Arc<dyn Storage>> = files
            .into_iter()
            .map(|(path, storage)| (lexical(&path), storage))
            .collect();
        let path = lexical(path);
        let ino = files
            .keys()
            .position(|p| *p == path)
            .map_or(0, |i| i as u64 + 1);
        ImageContext {
            chain: vec![ChainFile {
                dev: 0,
                ino,
                path: path.clone(),
            }],
            path: Some(path),
            parent_override: None,
            budget: MetadataBudget::default(),
            files: ParentFiles::Memory(Arc::new(files)),
        }
    }
}

impl ImageContext {
    /// What the chain's metadata is charged to.
    pub fn budget(&self) -> &MetadataBudget {
        &self.budget
    }

    /// The paths this image, a child, records for its parent at `parent` (symlinks
    /// resolved), as a new child there would.
    pub fn parent_paths(&self, parent: &Path) -> Result<StoredParentPaths> {
        let Some(child) = &self.path else {
            return Err(Error::invalid_input(
                "an image without a file path cannot record where its parent is",
            ));
        };
        match &self.files {
            ParentFiles::Host => stored_parent_paths(child, parent),
            ParentFiles::Memory(_) => Ok(StoredParentPaths {
                relative: relative_windows_path(child.parent().unwrap_or(Path::new("/")), parent),
                absolute: windows_form(parent),
                canonical: parent.to_path_buf(),
                windows: None,
                volume: None,
            }),
        }
    }

    /// The paths `link` stores that do not lead to `found`, where its parent was found
    /// (symlinks resolved), each described; empty when they are all current. A relative
    /// path must lead there (and one must be stored), so must absolute paths in host form,
    /// and a stored file name must be the parent's, letter case aside as Windows compares
    /// names. Paths this host cannot follow (a drive letter, a share) are not judged.
    pub fn stale_parent_paths(&self, link: &ParentLink, found: &Path) -> Vec<String> {
        let Some(child) = &self.path else {
            return Vec::new();
        };
        let dir = child.parent().unwrap_or(Path::new("/"));
        let leads_there = |candidate: &Path| match &self.files {
            ParentFiles::Host => fs::canonicalize(candidate).is_ok_and(|c| c == found),
            ParentFiles::Memory(_) => lexical(candidate) == found,
        };
        let found_name = found
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase());
        let mut stale = Vec::new();
        let mut relative_leads = false;
        for stored in &link.paths {
            let (ParentPath::Relative(text)
            | ParentPath::Absolute(text)
            | ParentPath::FileName(text)) = stored;
            let host = host_form(text);
            let host_absolute = host.starts_with('/') && !host.starts_with("//");
            match stored {
                ParentPath::Relative(_) if !host_absolute && !is_foreign_absolute(&host) => {
                    let relative = host.trim_start_matches("./");
                    if leads_there(&dir.join(relative)) {
                        relative_leads = true;
                    } else {
                        stale.push(format!("relative path '{text}' leads elsewhere"));
                    }
                }
                ParentPath::FileName(_) => {
                    let name = file_name(&host).map(str::to_lowercase);
                    if name.is_some() && name != found_name {
                        stale.push(format!("file name '{text}' is not the parent's"));
                    }
                }
                _ if host_absolute && !leads_there(Path::new(&host)) => {
                    stale.push(format!("absolute path '{text}' leads elsewhere"));
                }
                _ => {}
            }
        }
        if !relative_leads && !stale.iter().any(|s| s.starts_with("relative")) {
            stale.insert(0, "no relative path is stored".to_string());
        }
        stale
    }
}

/// The host form of a stored path: `\\?\` and `\??\` prefixes dropped, backslashes turned
/// into slashes, trailing NULs cut.
fn host_form(stored: &str) -> String {
    let trimmed = stored.trim_end_matches('\0');
    let unprefixed = ["\\\\?\\", "\\??\\", "//?/"]
        .iter()
        .find_map(|prefix| trimmed.strip_prefix(prefix))
        .unwrap_or(trimmed);
    unprefixed.replace('\\', "/")
}

/// Whether a host-form path is rooted in a way that means nothing on this host: a drive
/// letter (`C:/...`, `C:name`) or a network share (`//server/...`, `UNC/server/...`).
fn is_foreign_absolute(path: &str) -> bool {
    let bytes = path.as_bytes();
    (bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':')
        || path.starts_with("//")
        || path.starts_with("UNC/")
}

/// The last component of a host-form path, if it can name a file.
fn file_name(path: &str) -> Option<&str> {
    let bytes = path.as_bytes();
    let path = if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        &path[2..]
    } else {
        path
    };
    let name = path.rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then_some(name)
}

/// `path` in Windows form: backslashes for slashes.
fn windows_form(path: &Path) -> String {
    path.to_string_lossy().replace('/', "\\")
}

/// How to get from directory `from` to `to` (both absolute, symlinks resolved), in
/// Windows form: `.\name`, `..\dir\name`.
fn relative_windows_path(from: &Path, to: &Path) -> String {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec![".".to_string()];
    if common < from.len() {
        parts = vec!["..".to_string(); from.len() - common];
    }
    parts.extend(
        to[common..]
            .iter()
            .map(|c| c.as_os_str().to_string_lossy().into_owned()),
    );
    parts.join("\\")
}

/// Host paths to try for `paths`, in order: everything that lies beside or below the
/// child's directory `child_dir` first, then absolute host paths; no path twice.
pub fn candidate_paths(child_dir: &Path, paths: &[ParentPath]) -> Vec<PathBuf> {
    let mut near = Vec::new();
    let mut absolute = Vec::new();
    for stored in paths {
        let (ParentPath::Relative(s) | ParentPath::Absolute(s) | ParentPath::FileName(s)) = stored;
        let host = host_form(s);
        if host.is_empty() || host.contains('\0') {
            continue;
        }
        match stored {
            ParentPath::Relative(_) if !host.starts_with('/') && !is_foreign_absolute(&host) => {
                let mut relative = host.as_str();
                while let Some(rest) = relative.strip_prefix("./") {
                    relative = rest;
                }
                near.push(child_dir.join(relative));
                // Moved along with its child into another layout: found by its name beside
                // the child, as an absolute path's file is (the parent's identity decides).
                near.extend(file_name(&host).map(|n| child_dir.join(n)));
            }
            ParentPath::FileName(_) => near.extend(file_name(&host).map(|n| child_dir.join(n))),
            // Absolute paths, and relative ones that turn out not to be: the file is most
            // likely to have moved along with its child, so look beside the child first.
            _ => {
                near.extend(file_name(&host).map(|n| child_dir.join(n)));
                if host.starts_with('/') && !host.starts_with("//") {
                    absolute.push(PathBuf::from(&host));
                }
            }
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for path in near.into_iter().chain(absolute) {
        if !candidates.contains(&path) {
            candidates.push(path);
        }
    }
    candidates
}

/// Most images in one chain: far more than real chains use (Hyper-V checkpoints rarely
/// pass a dozen), few enough that a crafted chain cannot hold hundreds of files open.
pub const MAX_CHAIN_DEPTH: usize = 32;

/// Places no image may be read from, however a locator points there.
const FORBIDDEN_ROOTS: [&str; 3] = ["/proc", "/sys", "/dev"];
/// Filesystems whose files look regular but are kernel interfaces (statfs magic numbers):
/// proc, sysfs, debugfs, tracefs, securityfs, cgroup2.
const KERNEL_FILESYSTEMS: [i64; 6] = [
    0x9fa0,
    0x6265_6572,
    0x6462_6720,
    0x7472_6163,
    0x7363_6673,
    0x6367_7270,
];

/// Whether the open `file` lives on one of the `KERNEL_FILESYSTEMS`.
fn on_kernel_filesystem(file: &fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut stats = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: the descriptor is open for the call and `stats` is large enough.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so it filled `stats`.
    let kind = unsafe { stats.assume_init() }.f_type;
    // The field's integer type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    Ok(KERNEL_FILESYSTEMS.contains(&(kind as i64)))
}

fn describe_type(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// Why one candidate was not the parent.
enum Attempt {
    /// Nothing at that path.
    Missing,
    /// Something there, refused for the reason given.
    Refused(Error),
}

fn refused(candidate: &Path, problem: impl std::fmt::Display) -> Attempt {
    Attempt::Refused(Error::invalid_input(format!(
        "parent {}: {problem}",
        candidate.display()
    )))
}

fn hex_id(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).hyphenated().to_string()
}

/// Opens the image at `path` with its chain of parents.
pub fn open(path: &Path, options: &OpenOptions) -> Result<Box<dyn VirtualDisk>> {
    Ok(open_layered(path, options)?)
}

/// Opens the image at `path` with its chain of parents, as its top [`Layer`] (for callers
/// that want each file's facts).
pub fn open_layered(path: &Path, options: &OpenOptions) -> Result<Box<dyn Layer>> {
    open_file(path, options).map_err(|e| e.with_file(path))
}

/// Opens the image file at `path`, refusing anything but a regular file.
pub(crate) fn open_regular(path: &Path, writable: bool) -> Result<(fs::File, Metadata)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .context(|| "cannot open image".to_string())?;
    let meta = file
        .metadata()
        .context(|| "cannot read file attributes".to_string())?;
    if !meta.is_file() {
        return Err(Error::invalid_input("not a regular file"));
    }
    Ok((file, meta))
}

fn open_file(path: &Path, options: &OpenOptions) -> Result<Box<dyn Layer>> {
    let (file, meta) = open_regular(path, !options.read_only)?;
    let context = ImageContext::top(path, &meta, options.parent.clone())?;
    open_chain(Box::new(FileStorage::new(file)), options, &context)
}

/// Opens an image held by any [`Storage`]. Such an image has no path, so a differencing
/// image opened this way cannot find its parent.
pub fn open_storage(
    storage: Box<dyn Storage>,
    options: &OpenOptions,
) -> Result<Box<dyn VirtualDisk>> {
    Ok(open_chain(storage, options, &ImageContext::detached())?)
}

/// Opens an image held by any [`Storage`] that sits where `context` says, so its parents
/// can be found ([`ImageContext::in_memory`] keeps them in memory too).
pub fn open_storage_in(
    storage: Box<dyn Storage>,
    options: &OpenOptions,
    context: &ImageContext,
) -> Result<Box<dyn VirtualDisk>> {
    Ok(open_chain(storage, options, context)?)
}

/// Opens the image in `storage` and, in a loop, every parent it needs; returns the top
/// layer with each parent attached to its child.
pub fn open_chain(
    storage: Box<dyn Storage>,
    options: &OpenOptions,
    context: &ImageContext,
) -> Result<Box<dyn Layer>> {
    open_parents(
        open_layer(storage, options, &context.budget)?,
        options,
        context,
    )
}

/// Finds and opens, in a loop, every parent the image `top` (which sits where `context`
/// says) needs; returns it with each parent attached to its child.
pub fn open_parents(
    top: Box<dyn Layer>,
    options: &OpenOptions,
    context: &ImageContext,
) -> Result<Box<dyn Layer>> {
    let mut layers = vec![top];
    // Where each parent was found, in step with `layers[1..]`.
    let mut found_at = Vec::new();
    let mut place = context.clone();
    loop {
        let child = layers.last().expect("the top layer is open");
        let Some(link) = child.parent_link() else {
            break;
        };
        let found = open_parent(&place, link, child.logical_sector_size(), options);
        // A chain too large for memory is the opened image's problem, whichever parent
        // crossed the line: name both.
        let (path, parent, parent_place) =
            found.map_err(|e| match context.budget.is_exceeded() {
                true => Error::unsupported(format!("parent {e}")),
                false => e,
            })?;
        found_at.push(path);
        layers.push(parent);
        place = parent_place;
    }
    let mut below = layers.pop().expect("the top layer is open");
    while let Some(mut child) = layers.pop() {
        let path = found_at.pop().expect("one path per parent");
        child.attach_parent(Parent { path, layer: below });
        below = child;
    }
    Ok(below)
}

/// Most directory entries looked at when looking for an image's children.
const MAX_SIBLINGS: usize = 4096;

/// Differencing images in `image`'s directory whose stored parent paths lead to `image`.
/// Files that are not images, or cannot be opened, are passed over.
pub fn children_beside(image: &Path) -> Result<Vec<PathBuf>> {
    let target = image
        .canonicalize()
        .context(|| "cannot find the image's directory".to_string())?;
    let dir = target.parent().unwrap_or(Path::new("/"));
    let entries = fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))?;
    let mut children = Vec::new();
    for entry in entries.flatten().take(MAX_SIBLINGS) {
        let path = entry.path();
        if path == target || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        let storage = FileStorage::new(file);
        if probe(&storage).is_err() {
            continue;
        }
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let Ok(layer) = open_layer(Box::new(storage), &options, &MetadataBudget::default()) else {
            continue;
        };
        let names_image = layer.parent_link().is_some_and(|link| {
            candidate_paths(dir, &link.paths)
                .iter()
                .any(|candidate| candidate.canonicalize().is_ok_and(|c| c == target))
        });
        if names_image {
            children.push(path);
        }
    }
    children.sort();
    Ok(children)
}

/// How a message names children that [`children_beside`] found: the first one, and how
/// many more there are.
pub fn name_children(children: &[PathBuf]) -> String {
    match children {
        [] => String::new(),
        [only] => only.display().to_string(),
        [first, rest @ ..] => format!("{} (and {} more)", first.display(), rest.len()),
    }
}

/// The paths a new differencing image at `child` records for its existing `parent`.
pub fn stored_parent_paths(child: &Path, parent: &Path) -> Result<StoredParentPaths> {
    let canonical = fs::canonicalize(parent)
        .map_err(|e| Error::io("cannot resolve the parent path", e).with_file(parent))?;
    let child_dir = child
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let child_dir = fs::canonicalize(child_dir)
        .map_err(|e| Error::io("cannot resolve the image's directory", e))?;
    Ok(StoredParentPaths {
        relative: relative_windows_path(&child_dir, &canonical),
        absolute: windows_form(&canonical),
        canonical,
        windows: None,
        volume: None,
    })
}

/// What a new differencing image at `child` takes from `parent`, opened read-only with
/// its own chain (a parent that cannot be opened cannot be a parent).
pub fn parent_image(child: &Path, parent: &Path) -> Result<ParentImage> {
    let options = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let disk = open_layered(parent, &options)?;
    let paths = stored_parent_paths(child, parent)?;
    let in_parent = |problem: &str| Error::invalid_input(problem.to_string()).with_file(parent);
    let identity = disk
        .identity()
        .ok_or_else(|| in_parent("a raw image cannot be a parent"))?;
    let facts = disk.facts();
    Ok(ParentImage {
        format: disk.format(),
        identity,
        disk_id: facts.disk_id,
        size: disk.size(),
        logical_sector_size: disk.logical_sector_size(),
        physical_sector_size: disk.physical_sector_size(),
        time_stamp: facts.time_stamp,
        paths,
    })
}

/// Finds and opens, read-only (unless `options` asks for a writable first parent) and
/// without its own parent, the parent `link` names for
/// the image `place` describes (whose logical sectors are `sector_size` bytes); returns
/// where it was found (symlinks resolved), the image, and where the parent sits in turn.
fn open_parent(
    place: &ImageContext,
    link: &ParentLink,
    sector_size: u32,
    options: &OpenOptions,
) -> Result<(PathBuf, Box<dyn Layer>, ImageContext)> {
    let Some(child_path) = &place.path else {
        return Err(Error::invalid_input(format!(
            "{} without a file path: its parent cannot be located (open it by path)",
            link.child_kind
        )));
    };
    if place.chain.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::unsupported(format!(
            "{} has more than {MAX_CHAIN_DEPTH} images in its chain of parents",
            link.child_kind
        )));
    }
    let child_dir = child_path.parent().unwrap_or(Path::new("/"));
    let candidates = match &place.parent_override {
        Some(path) => vec![path.clone()],
        None => candidate_paths(child_dir, &link.paths),
    };
    // Refusals are told once: as warnings when another candidate is taken or beside the
    // first one, which is the error.
    let mut refusals = Vec::new();
    for candidate in &candidates {
        match try_parent(place, candidate, link, sector_size, options) {
            Ok(found) => {
                refusals.iter().for_each(|e| log::warn!("{e}"));
                return Ok(found);
            }
            Err(Attempt::Missing) => {}
            Err(Attempt::Refused(e)) => refusals.push(e),
        }
    }
    let mut refusals = refusals.into_iter();
    if let Some(first) = refusals.next() {
        refusals.for_each(|e| log::warn!("{e}"));
        return Err(first);
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Error::io(
        if tried.is_empty() {
            "parent not found: the image stores no usable parent path".to_string()
        } else {
            format!("parent not found; tried {}", tried.join(", "))
        },
        io::Error::from_raw_os_error(libc::ENOENT),
    ))
}

/// Finds `candidate` on the host and checks it can only be an image file: a regular
/// file outside the kernel's own filesystems, checked on the path and again on the open
/// descriptor; returns where it resolves to, its device and inode, and the file, open
/// for writing too if `writable`.
fn locate_host_file(
    candidate: &Path,
    writable: bool,
) -> std::result::Result<(PathBuf, (u64, u64), Located), Attempt> {
    let meta = match fs::metadata(candidate) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Attempt::Missing),
        Err(e) => return Err(refused(candidate, format_args!("cannot inspect: {e}"))),
    };
    let canonical = fs::canonicalize(candidate)
        .map_err(|e| refused(candidate, format_args!("cannot resolve: {e}")))?;
    if let Some(root) = FORBIDDEN_ROOTS
        .iter()
        .find(|root| canonical.starts_with(root))
    {
        return Err(refused(
            candidate,
            format_args!(
                "resolves to {} under {root}, where no image is read from",
                canonical.display()
            ),
        ));
    }
    if !meta.is_file() {
        return Err(refused(candidate, describe_type(&meta)));
    }
    // The checks above ran on a path that may change before the open: the descriptor is
    // checked again. Non-blocking, so a FIFO swapped in cannot hang the open; no symlink
    // is followed at the end of a path that had none.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(&canonical)
        .map_err(|e| refused(candidate, format_args!("cannot open: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| refused(candidate, format_args!("cannot inspect: {e}")))?;
    if !meta.is_file() {
        return Err(refused(candidate, describe_type(&meta)));
    }
    match on_kernel_filesystem(&file) {
        Ok(false) => {}
        Ok(true) => return Err(refused(candidate, "a kernel interface, not an image")),
        Err(e) => return Err(refused(candidate, format_args!("cannot inspect: {e}"))),
    }
    Ok((canonical, (meta.dev(), meta.ino()), Located::File(file)))
}

fn try_parent(
    context: &ImageContext,
    candidate: &Path,
    link: &ParentLink,
    sector_size: u32,
    options: &OpenOptions,
) -> std::result::Result<(PathBuf, Box<dyn Layer>, ImageContext), Attempt> {
    // Only the first parent, the one a merge writes into; its own parents stay read-only.
    let writable = options.writable_parent && context.chain.len() == 1;
    let (canonical, (dev, ino), located) = match &context.files {
        ParentFiles::Host => locate_host_file(candidate, writable)?,
        ParentFiles::Memory(files) => {
            let key = lexical(candidate);
            let (index, storage) = files
                .iter()
                .enumerate()
                .find_map(|(i, (path, storage))| (*path == key).then_some((i, storage)))
                .ok_or(Attempt::Missing)?;
            (key, (0, index as u64 + 1), Located::Memory(storage.clone()))
        }
    };
    if context.chain.iter().any(|f| f.dev == dev && f.ino == ino) {
        let chain: Vec<String> = context
            .chain
            .iter()
            .map(|f| f.path.display().to_string())
            .chain([canonical.display().to_string()])
            .collect();
        return Err(refused(
            candidate,
            format_args!(
                "the chain of parents loops back to an image already in it ({})",
                chain.join(" -> ")
            ),
        ));
    }
    // A parent must not change under its children: shared with readers, kept from
    // writers (qemu's included) for as long as it is open. One written into is locked as
    // a read-write mount locks its image.
    let storage: Box<dyn Storage> = match located {
        Located::File(file) => {
            crate::lock::lock(&file, !writable).map_err(|problem| refused(candidate, problem))?;
            Box::new(FileStorage::new(file))
        }
        Located::Memory(storage) => Box::new(storage),
    };
    let format = match probe(storage.as_ref()) {
        Ok(format) => format,
        Err(e) if matches!(e.kind(), ErrorKind::NotADiskImage) => {
            return Err(refused(candidate, "not a VHD or VHDX disk image"));
        }
        Err(e) => return Err(Attempt::Refused(e.with_file(&canonical))),
    };
    if format != link.format {
        return Err(refused(
            candidate,
            format_args!(
                "is a {format} image; a {} needs a {} parent",
                link.child_kind, link.format
            ),
        ));
    }
    let mut chain = context.chain.clone();
    chain.push(ChainFile {
        dev,
        ino,
        path: canonical.clone(),
    });
    let parent_context = ImageContext {
        path: Some(canonical.clone()),
        parent_override: None,
        chain,
        budget: context.budget.clone(),
        files: context.files.clone(),
    };
    let parent_options = OpenOptions {
        read_only: !writable,
        format: Some(format),
        parent: None,
        writable_parent: false,
        keep_identity: writable,
        ..options.clone()
    };
    let disk = open_layer(storage, &parent_options, &parent_context.budget)
        .map_err(|e| Attempt::Refused(e.with_file(&canonical)))?;
    match disk.identity() {
        Some(id) if link.identities.contains(&id) => {}
        found => {
            return Err(refused(
                candidate,
                format_args!(
                    "not this image's parent: its identifier is {}, the child expects {}",
                    found.as_ref().map_or("missing".to_string(), hex_id),
                    link.identities
                        .first()
                        .map_or("no identifier".to_string(), hex_id)
                ),
            ));
        }
    }
    if disk.logical_sector_size() != sector_size {
        return Err(refused(
            candidate,
            format_args!(
                "has {}-byte logical sectors, the child {sector_size}-byte ones",
                disk.logical_sector_size()
            ),
        ));
    }
    Ok((canonical, disk, parent_context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Format;

    fn candidates(paths: &[ParentPath]) -> Vec<String> {
        candidate_paths(Path::new("/vm/child"), paths)
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }

    #[test]
    fn parents_in_memory_are_found_and_checked_like_files() {
        use crate::create::{CreateOptions, create};
        use crate::storage::MemStorage;
        let dir = tempfile::tempdir().unwrap();
        let (parent, child) = (dir.path().join("parent.vhd"), dir.path().join("child.vhd"));
        let sized = CreateOptions {
            size: Some(4 << 20),
            ..Default::default()
        };
        create(&parent, &sized).unwrap();
        let disk = crate::open(&parent, &OpenOptions::default()).unwrap();
        disk.write_at(&[0x5A; 4096], 1 << 20).unwrap();
        disk.close().unwrap();
        let with_parent = CreateOptions {
            parent: Some(parent.clone()),
            ..Default::default()
        };
        create(&child, &with_parent).unwrap();
        let in_memory = |path: &Path| -> Arc<dyn Storage> {
            Arc::new(MemStorage::from_vec(fs::read(path).unwrap()))
        };
        let child_storage = Box::new(in_memory(&child));

        let files = BTreeMap::from([(PathBuf::from("/vm/./x/../parent.vhd"), in_memory(&parent))]);
        let context = ImageContext::in_memory(Path::new("/vm/child.vhd"), files);
        let disk =
            open_storage_in(child_storage.clone(), &OpenOptions::default(), &context).unwrap();
        assert_eq!(disk.parent().unwrap().0, Path::new("/vm/parent.vhd"));
        let mut buf = vec![0u8; 4096];
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, [0x5A; 4096]);

        let elsewhere = ImageContext::in_memory(Path::new("/other/child.vhd"), BTreeMap::new());
        let err = open_storage_in(child_storage, &OpenOptions::default(), &elsewhere)
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .contains("parent not found; tried /other/parent.vhd"),
            "{err}"
        );
    }

    #[test]
    fn relative_paths_in_windows_form() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            relative_windows_path(&p("/vm/a"), &p("/vm/a/base.vhd")),
            ".\\base.vhd"
        );
        assert_eq!(
            relative_windows_path(&p("/vm/a"), &p("/vm/b/base.vhd")),
            "..\\b\\base.vhd"
        );
        assert_eq!(
            relative_windows_path(&p("/vm/a/x"), &p("/base.vhd")),
            "..\\..\\..\\base.vhd"
        );
        assert_eq!(
            relative_windows_path(&p("/"), &p("/d/base.vhd")),
            ".\\d\\base.vhd"
        );
        assert_eq!(windows_form(&p("/srv/vm/base.vhd")), "\\srv\\vm\\base.vhd");
    }

    #[test]
    fn windows_paths_map_beside_the_child_first() {
        use ParentPath::*;
        assert_eq!(
            candidates(&[
                Relative(".\\base.vhd".into()),
                Absolute("C:\\VMs\\base.vhd".into()),
                FileName("C:\\VMs\\base.vhd".into()),
            ]),
            ["/vm/child/base.vhd"]
        );
        assert_eq!(
            candidates(&[
                Relative("..\\disks\\base.vhd\0\0".into()),
                Absolute("\\\\?\\D:\\disks\\base.vhd".into()),
            ]),
            ["/vm/child/../disks/base.vhd", "/vm/child/base.vhd"]
        );
        // A network share and a host path: the name beside the child, then the host path.
        assert_eq!(
            candidates(&[
                Absolute("\\\\server\\share\\p.vhd".into()),
                Absolute("\\\\?\\UNC\\server\\share\\q.vhd".into()),
                Absolute("\\srv\\images\\r.vhd".into()),
                Absolute("/srv/images/s.vhd".into()),
            ]),
            [
                "/vm/child/p.vhd",
                "/vm/child/q.vhd",
                "/vm/child/r.vhd",
                "/vm/child/s.vhd",
                "/srv/images/r.vhd",
                "/srv/images/s.vhd"
            ]
        );
        // A "relative" locator holding an absolute path is treated as absolute.
        assert_eq!(
            candidates(&[Relative("E:\\x.vhd".into())]),
            ["/vm/child/x.vhd"]
        );
        assert_eq!(
            candidates(&[Relative("/abs/x.vhd".into())]),
            ["/vm/child/x.vhd", "/abs/x.vhd"]
        );
        // Colons are ordinary in host names; only a leading drive letter is dropped.
        assert_eq!(
            candidates(&[
                FileName("ab:c.vhd".into()),
                Absolute("/data/c:d.vhd".into()),
                FileName("C:e.vhd".into()),
            ]),
            [
                "/vm/child/ab:c.vhd",
                "/vm/child/c:d.vhd",
                "/vm/child/e.vhd",
                "/data/c:d.vhd"
            ]
        );
    }

    #[test]
    fn kernel_interfaces_are_recognised_by_their_filesystem() {
        let proc_file = fs::File::open("/proc/self/status").unwrap();
        assert!(on_kernel_filesystem(&proc_file).unwrap());
        let sys_file = fs::File::open("/sys/kernel/mm/transparent_hugepage/enabled")
            .or_else(|_| fs::File::open("/sys/power/state"));
        if let Ok(sys_file) = sys_file {
            assert!(on_kernel_filesystem(&sys_file).unwrap());
        }
        let plain = tempfile::tempfile().unwrap();
        assert!(!on_kernel_filesystem(&plain).unwrap());
    }

    #[test]
    fn useless_paths_give_no_candidates() {
        use ParentPath::*;
        assert!(
            candidates(&[
                Relative(String::new()),
                Relative("\0\0".into()),
                FileName("C:\\dir\\".into()),
                FileName("..".into()),
                Absolute("C:".into()),
                Relative("a\0b".into()),
            ])
            .is_empty()
        );
    }

    #[test]
    fn an_image_without_a_path_cannot_have_its_parent_found() {
        let err = open_parent(
            &ImageContext::detached(),
            &ParentLink {
                paths: vec![ParentPath::FileName("base.vhd".into())],
                identities: vec![[1; 16]],
                format: Format::Vhd,
                child_kind: "VHD differencing disk",
            },
            512,
            &OpenOptions::default(),
        )
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "VHD differencing disk without a file path: its parent cannot be located \
             (open it by path)"
        );
    }

    #[test]
    fn chains_deeper_than_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let child = dir.path().join("child.vhd");
        fs::write(&child, b"x").unwrap();
        let mut context = ImageContext::top(&child, &fs::metadata(&child).unwrap(), None).unwrap();
        let request = ParentLink {
            paths: vec![ParentPath::FileName("base.vhd".into())],
            identities: vec![[1; 16]],
            format: Format::Vhd,
            child_kind: "VHD differencing disk",
        };
        context.chain = vec![context.chain[0].clone(); MAX_CHAIN_DEPTH - 1];
        let err = open_parent(&context, &request, 512, &OpenOptions::default())
            .err()
            .unwrap();
        assert!(err.to_string().starts_with("parent not found"), "{err}");
        context.chain.push(context.chain[0].clone());
        let err = open_parent(&context, &request, 512, &OpenOptions::default())
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "VHD differencing disk has more than 32 images in its chain of parents"
        );
    }

    #[test]
    fn missing_parents_list_every_path_tried() {
        let dir = tempfile::tempdir().unwrap();
        let child = dir.path().join("child.vhd");
        fs::write(&child, b"x").unwrap();
        let context = ImageContext::top(&child, &fs::metadata(&child).unwrap(), None).unwrap();
        let request = ParentLink {
            paths: vec![
                ParentPath::Relative(".\\base.vhd".into()),
                ParentPath::Absolute("\\nowhere\\base2.vhd".into()),
            ],
            identities: vec![[1; 16]],
            format: Format::Vhd,
            child_kind: "VHD differencing disk",
        };
        let err = open_parent(&context, &request, 512, &OpenOptions::default())
            .err()
            .unwrap();
        let dir = fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "parent not found; tried {0}/base.vhd, {0}/base2.vhd, /nowhere/base2.vhd: \
                 No such file or directory (os error 2)",
                dir.display()
            )
        );
        assert_eq!(err.errno(), libc::ENOENT);
    }
}
