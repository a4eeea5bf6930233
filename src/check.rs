//! `vdisk check`: every structure of a VHD or VHDX examined, findings typed (structure,
//! file offset, problem, severity, repair) so text and JSON come from one list, and
//! `--repair` through the drivers' crash-safe paths.
//!
//! A check opens the image read-only, locked against writers, with the drivers reporting
//! every problem they can work around instead of stopping at the first (see
//! [`crate::finding::Problems`]), then adds what an open skips: copies that readers other
//! than this one use, the link to the parent, space no structure uses that still takes
//! room on the host, holes in a fixed image.
//!
//! A repair holds the image locked exclusively. It opens the image for writing as a
//! check opens it, which replays a dirty log; the driver rewrites damaged copies from the
//! good ones and, with [`RepairLevel::All`], makes bad BAT entries read as zeros; then,
//! once nothing corrupt is left, unused space is given back (holes, and the file cut after
//! its last structure as compaction does). Each step is a write path the drivers use
//! anyway, durable before the next, so a repair killed at any instant leaves an image
//! that opens. A second check then gives the report.

use crate::chain::{self, ImageContext};
use crate::compact::human;
use crate::disk::{Format, OpenOptions};
use crate::error::{CorruptionKind, Error, ErrorKind, IoContext, Result};
use crate::finding::{Finding, Fix, Problems, RepairLevel, Severity};
use crate::layer::Layer;
use crate::lock;
use crate::open::probe;
use crate::storage::{FileStorage, Storage};
use crate::vhd::VhdDisk;
use crate::vhdx::VhdxDisk;
use serde::Serialize;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// Unused space counts as leaked only in whole pages: the host allocates no less.
const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// Repair what the findings allow, up to this level.
    pub repair: Option<RepairLevel>,
}

/// What a check found, and what a repair did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub image: String,
    pub format: String,
    /// `fixed`, `dynamic` or `differencing`; absent when the image cannot be opened.
    pub subtype: Option<String>,
    pub file_length: u64,
    /// Bytes of the file that are holes on the host.
    pub holes: u64,
    /// What is wrong now (after a repair, what it left), worst first.
    pub findings: Vec<Finding>,
    pub corruptions: usize,
    pub leaks: usize,
    /// What a repair did, in order.
    pub repaired: Vec<String>,
    /// Ranges of the virtual disk whose data a repair gave up: they read as zeros now.
    pub given_up: Vec<GivenUp>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GivenUp {
    /// The BAT entry that named the data.
    pub entry: u64,
    pub disk_start: u64,
    pub disk_end: u64,
}

/// The outcome a check's exit status tells, as `qemu-img check`'s does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Clean,
    Corrupt,
    /// Leaked space, and no corruption.
    Leaks,
}

impl Status {
    /// `qemu-img check`'s exit status: 0 clean, 2 corrupt, 3 leaks only (1, could not
    /// check, is an error's).
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Clean => 0,
            Status::Corrupt => 2,
            Status::Leaks => 3,
        }
    }
}

impl CheckReport {
    pub fn status(&self) -> Status {
        if self.corruptions > 0 {
            Status::Corrupt
        } else if self.leaks > 0 {
            Status::Leaks
        } else {
            Status::Clean
        }
    }
}

/// Checks the image at `path` (and the link to its parent), repairing it if asked.
pub fn check(path: &Path, options: &CheckOptions) -> Result<CheckReport> {
    check_file(path, options).map_err(|e| e.with_file(path))
}

fn check_file(path: &Path, options: &CheckOptions) -> Result<CheckReport> {
    let (file, meta) = chain::open_regular(path, options.repair.is_some())?;
    // Held by the open file until the check is over: shared with readers for a check, as
    // a read-only mount holds it; exclusive for a repair, as a read-write mount does.
    lock::lock(&file, options.repair.is_none())
        .map_err(|problem| Error::new(ErrorKind::InUse(problem)))?;
    if options.repair == Some(RepairLevel::All)
        && let Some(child) = chain::children_beside(path)?.first()
    {
        return Err(Error::invalid_input(format!(
            "{} is the parent of the differencing image {}: blocks read as zeros after \
             --repair=all would change what the child reads; repair the parent apart from \
             its children",
            path.display(),
            child.display()
        )));
    }
    let context = ImageContext::top(path, &meta, None)?;
    check_storage(path, Arc::new(FileStorage::new(file)), &context, options)
}

/// Checks, and repairs if asked, the image held by `storage`, known as `path` and sitting
/// where `context` says; the caller holds whatever lock the image needs.
pub fn check_storage(
    path: &Path,
    storage: Arc<dyn Storage>,
    context: &ImageContext,
    options: &CheckOptions,
) -> Result<CheckReport> {
    let mut examined = examine(&storage, context)?;
    let mut repaired = Vec::new();
    let mut given_up = Vec::new();
    if let Some(level) = options.repair {
        repair(
            &storage,
            context,
            level,
            &examined,
            &mut repaired,
            &mut given_up,
        )?;
        examined = examine(&storage, context)?;
    }
    let mut findings = examined.findings;
    findings.sort_by_key(|f| f.severity);
    let count = |severity| findings.iter().filter(|f| f.severity == severity).count();
    Ok(CheckReport {
        image: path.display().to_string(),
        format: examined.format.to_string(),
        subtype: examined.subtype.map(str::to_string),
        file_length: examined.file_length,
        holes: examined.holes,
        corruptions: count(Severity::Corruption),
        leaks: count(Severity::Leak),
        findings,
        repaired,
        given_up,
    })
}

/// One look at the image.
struct Examined {
    format: Format,
    /// Absent when the image could not be opened.
    subtype: Option<&'static str>,
    file_length: u64,
    holes: u64,
    findings: Vec<Finding>,
}

/// An image opened by its driver as a check opens it.
enum Driver {
    Vhd(Box<VhdDisk>),
    Vhdx(Box<VhdxDisk>),
}

impl Driver {
    fn open(
        format: Format,
        storage: &Arc<dyn Storage>,
        read_only: bool,
        context: &ImageContext,
        findings: &mut Vec<Finding>,
    ) -> Result<Driver> {
        let options = OpenOptions {
            read_only,
            ..OpenOptions::default()
        };
        let storage: Box<dyn Storage> = Box::new(storage.clone());
        let budget = context.budget();
        let mut problems = Problems::Record(findings);
        Ok(match format {
            Format::Vhd => Driver::Vhd(Box::new(VhdDisk::open_reporting(
                storage,
                &options,
                budget,
                &mut problems,
            )?)),
            Format::Vhdx => Driver::Vhdx(Box::new(VhdxDisk::open_reporting(
                storage,
                &options,
                budget,
                &mut problems,
            )?)),
            Format::Raw => unreachable!("probing never finds a raw image"),
        })
    }

    fn layer(&self) -> &dyn Layer {
        match self {
            Driver::Vhd(disk) => disk.as_ref(),
            Driver::Vhdx(disk) => disk.as_ref(),
        }
    }

    fn into_layer(self) -> Box<dyn Layer> {
        match self {
            Driver::Vhd(disk) => disk,
            Driver::Vhdx(disk) => disk,
        }
    }

    fn check_more(&self, findings: &mut Vec<Finding>) -> Result<()> {
        match self {
            Driver::Vhd(disk) => disk.check_more(findings),
            Driver::Vhdx(disk) => {
                disk.check_more(findings);
                Ok(())
            }
        }
    }

    fn repair(&self, fixes: &[&Fix]) -> Result<Vec<String>> {
        match self {
            Driver::Vhd(disk) => disk.repair(fixes),
            Driver::Vhdx(disk) => disk.repair(fixes),
        }
    }

    fn rewrite_parent_paths(&self, parent: &Path, context: &ImageContext) -> Result<String> {
        let paths = context.parent_paths(parent)?;
        match self {
            Driver::Vhd(disk) => {
                let name = parent.file_name().unwrap_or_default().to_string_lossy();
                disk.rewrite_parent_paths(&name, &paths)
            }
            Driver::Vhdx(disk) => disk.rewrite_parent_paths(&paths),
        }
    }
}

/// Looks at the image in `storage`, read-only: what its driver reports opening it, what
/// it adds, the link to its parent, leaked space and holes.
fn examine(storage: &Arc<dyn Storage>, context: &ImageContext) -> Result<Examined> {
    let format = probe(storage.as_ref())?;
    let file_length = storage
        .len()
        .context(|| "cannot read file size".to_string())?;
    let data: u64 = storage
        .data_ranges(0, file_length)
        .context(|| "finding the file's holes".to_string())?
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    let holes = file_length.saturating_sub(data);
    let mut findings = Vec::new();
    let driver = match Driver::open(format, storage, true, context, &mut findings) {
        Ok(driver) => driver,
        // Damage the driver cannot work around ends the look.
        Err(e) if e.corruption_kind().is_some() => {
            findings.push(Finding::from_error(&e, None, Fix::None));
            return Ok(Examined {
                format,
                subtype: None,
                file_length,
                holes,
                findings,
            });
        }
        Err(e) => return Err(e),
    };
    driver.check_more(&mut findings)?;
    let layer = driver.layer();
    let subtype = layer.facts().subtype;
    if let Some(relocation) = layer.relocation() {
        for free in relocation.free_space().ranges() {
            findings.extend(leak(storage.as_ref(), free.start, free.end)?);
        }
    }
    if subtype == "fixed" && holes > 0 {
        findings.push(Finding::info(
            "file",
            None,
            format!(
                "{} of this fixed image are holes on the host; Hyper-V refuses a sparse \
                 fixed image",
                human(holes)
            ),
            Fix::None,
        ));
    }
    if layer.parent_link().is_some() {
        findings.extend(check_parent(driver.into_layer(), context)?);
    }
    Ok(Examined {
        format,
        subtype: Some(subtype),
        file_length,
        holes,
        findings,
    })
}

/// The unused range `start..end`, as a finding if whole pages of it take space on the
/// host.
fn leak(storage: &dyn Storage, start: u64, end: u64) -> Result<Option<Finding>> {
    let pages = start.next_multiple_of(PAGE)..end / PAGE * PAGE;
    if pages.start >= pages.end {
        return Ok(None);
    }
    let held: u64 = storage
        .data_ranges(pages.start, pages.end - pages.start)
        .context(|| format!("finding the holes of unused space at {start:#x}"))?
        .iter()
        .map(|r| r.end.min(pages.end).div_ceil(PAGE) - r.start / PAGE)
        .sum::<u64>()
        * PAGE;
    Ok((held > 0).then(|| {
        Finding::leak(
            pages.start,
            pages.end,
            format!(
                "{} of the {} no structure uses here take space on the host",
                human(held),
                human(pages.end - pages.start)
            ),
        )
    }))
}

/// Whether the parent the image names opens, carrying the identity the image expects,
/// and whether the paths it stores still lead there. A chain too large to open is beyond
/// checking, not damaged.
fn check_parent(layer: Box<dyn Layer>, context: &ImageContext) -> Result<Option<Finding>> {
    let options = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let Some(link) = layer.parent_link().cloned() else {
        return Ok(None);
    };
    match chain::open_parents(layer, &options, context) {
        Err(e) if matches!(e.kind(), ErrorKind::Unsupported(_)) => Err(e),
        Err(e) => Ok(Some(Finding::corruption(
            CorruptionKind::InvalidField,
            "parent link",
            None,
            e.to_string(),
            Fix::None,
        ))),
        Ok(top) => {
            let Some(found) = top.parent_layer().map(|p| p.path.clone()) else {
                return Ok(None);
            };
            let stale = context.stale_parent_paths(&link, &found);
            Ok((!stale.is_empty()).then(|| {
                Finding::info(
                    "parent locator",
                    None,
                    format!(
                        "the parent was found at {}, but {}",
                        found.display(),
                        stale.join(", ")
                    ),
                    Fix::RewriteParentPaths { parent: found },
                )
            }))
        }
    }
}

/// Applies what `examined` found fixable up to `level`, noting what was done.
fn repair(
    storage: &Arc<dyn Storage>,
    context: &ImageContext,
    level: RepairLevel,
    examined: &Examined,
    repaired: &mut Vec<String>,
    given_up: &mut Vec<GivenUp>,
) -> Result<()> {
    if examined.subtype.is_none() {
        return Ok(());
    }
    let fixes: Vec<&Fix> = examined
        .findings
        .iter()
        .map(|f| &f.fix)
        .filter(|fix| fix.level().is_some_and(|l| l <= level))
        .filter(|fix| !matches!(fix, Fix::Release { .. }))
        .collect();
    if !fixes.is_empty() {
        let driver = Driver::open(examined.format, storage, false, context, &mut Vec::new())?;
        repaired.extend(driver.repair(&fixes)?);
        for fix in &fixes {
            if let Fix::RewriteParentPaths { parent } = fix {
                repaired.push(driver.rewrite_parent_paths(parent, context)?);
            }
        }
        driver.layer().close()?;
        given_up.extend(fixes.iter().filter_map(|fix| match fix {
            Fix::GiveUp {
                entry,
                disk_start,
                disk_end,
            } => Some(GivenUp {
                entry: *entry,
                disk_start: *disk_start,
                disk_end: *disk_end,
            }),
            _ => None,
        }));
        match given_up.len() {
            0 => {}
            1 => repaired.push("1 BAT entry set to read as zeros".to_string()),
            n => repaired.push(format!("{n} BAT entries set to read as zeros")),
        }
    }
    // Space is only given back once nothing corrupt is left: a bad entry may still name
    // it.
    let now = examine(storage, context)?;
    let leaks: Vec<(u64, u64)> = now
        .findings
        .iter()
        .filter_map(|f| match f.fix {
            Fix::Release { start, end } => Some((start, end)),
            _ => None,
        })
        .collect();
    let corrupt = now
        .findings
        .iter()
        .any(|f| f.severity == Severity::Corruption);
    if leaks.is_empty() || corrupt || now.subtype.is_none() {
        return Ok(());
    }
    let driver = Driver::open(now.format, storage, false, context, &mut Vec::new())?;
    for &(start, end) in &leaks {
        storage
            .punch_hole(start, end - start)
            .context(|| format!("releasing unused space at {start:#x}"))?;
    }
    let layer = driver.layer();
    if let Some(relocation) = layer.relocation() {
        relocation.shrink()?;
    }
    layer.close()?;
    repaired.push(format!(
        "{} of unused space released",
        human(leaks.iter().map(|(s, e)| e - s).sum())
    ));
    Ok(())
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.image, self.format)?;
        if let Some(subtype) = &self.subtype {
            write!(f, " ({subtype})")?;
        }
        write!(f, ", {} file", human(self.file_length))?;
        if self.holes > 0 {
            write!(f, ", {} of it holes on the host", human(self.holes))?;
        }
        writeln!(f)?;
        for done in &self.repaired {
            writeln!(f, "repaired: {done}")?;
        }
        for g in &self.given_up {
            writeln!(
                f,
                "given up: disk bytes {:#x}..{:#x} (BAT entry {}) now read as zeros",
                g.disk_start, g.disk_end, g.entry
            )?;
        }
        for finding in &self.findings {
            let severity = match finding.severity {
                Severity::Corruption => "corruption",
                Severity::Leak => "leak",
                Severity::Info => "info",
            };
            let hint = match &finding.fix {
                Fix::None => "",
                Fix::RewriteCopy => " [--repair rewrites it from the good copy]",
                Fix::ReplayLog => " [--repair replays it]",
                Fix::Release { .. } => " [--repair releases it]",
                Fix::RewriteParentPaths { .. } => " [--repair rewrites the paths]",
                Fix::ClearStaleBits => " [--repair clears them]",
                Fix::GiveUp { .. } => {
                    " [--repair=all makes the block read as zeros, giving up its data]"
                }
            };
            writeln!(f, "{severity}: {finding}{hint}")?;
        }
        let plural = |n: usize, what: &str| match n {
            1 => format!("1 {what}"),
            n => format!("{n} {what}s"),
        };
        match self.status() {
            Status::Clean => writeln!(f, "{}: clean", self.image),
            _ => writeln!(
                f,
                "{}: {}, {}",
                self.image,
                plural(self.corruptions, "corruption"),
                plural(self.leaks, "leak")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, ImageType, create};
    use crate::storage::{Crashing, MemStorage};
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;
    const DISK: u64 = 8 * MIB;
    /// What the images made here hold: (offset, length, byte).
    const WRITES: [(u64, usize, u8); 3] = [
        (0, 100_000, 0x11),
        (3 * MIB + 7, 5000, 0x22),
        (7 * MIB, MIB as usize, 0x33),
    ];
    // Where `vdisk create` puts a VHDX's structures, and a VHD's BAT.
    const VHDX_BAT: u64 = 2 * MIB;
    const VHD_BAT: u64 = 1536;

    fn ext(format: Format) -> &'static str {
        match format {
            Format::Vhd => "vhd",
            _ => "vhdx",
        }
    }

    /// A new image holding [`WRITES`], closed cleanly, with its parent's files when it is
    /// a child.
    fn image(format: Format, kind: Option<ImageType>) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("image.{}", ext(format)));
        let options = CreateOptions {
            format: Some(format),
            image_type: kind,
            size: Some(DISK),
            block_size: Some(if format == Format::Vhd {
                512 << 10
            } else {
                MIB as u32
            }),
            ..CreateOptions::default()
        };
        create(&path, &options).unwrap();
        written(std::fs::read(path).unwrap(), &WRITES, true)
    }

    /// `image` with `writes` made through the driver; closed cleanly, or left as a crash
    /// right after them would leave it.
    fn written(image: Vec<u8>, writes: &[(u64, usize, u8)], close: bool) -> Vec<u8> {
        let storage = Arc::new(MemStorage::from_vec(image));
        let disk = crate::open_storage(Box::new(storage.clone()), &OpenOptions::default()).unwrap();
        for &(at, len, byte) in writes {
            disk.write_at(&vec![byte; len], at).unwrap();
        }
        disk.flush().unwrap();
        if close {
            disk.close().unwrap();
        }
        storage.contents()
    }

    /// The virtual disk `image` holds, read through a normal read-only open.
    fn contents(image: &[u8]) -> Vec<u8> {
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let disk =
            crate::open_storage(Box::new(MemStorage::from_vec(image.to_vec())), &options).unwrap();
        let mut all = vec![0u8; disk.size() as usize];
        disk.read_at(&mut all, 0).unwrap();
        all
    }

    /// Checks `image` (repairing it as `repair` says) and returns the report and the file
    /// afterwards.
    fn run(image: &[u8], repair: Option<RepairLevel>) -> (CheckReport, Vec<u8>) {
        let storage = Arc::new(MemStorage::from_vec(image.to_vec()));
        let report = check_storage(
            Path::new("image"),
            storage.clone(),
            &ImageContext::detached(),
            &CheckOptions { repair },
        )
        .unwrap();
        if repair.is_none() {
            assert_eq!(storage.write_count(), 0, "a check wrote");
        }
        (report, storage.contents())
    }

    fn patch(image: &mut [u8], at: u64, bytes: &[u8]) {
        image[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    }

    fn listed(report: &CheckReport) -> Vec<String> {
        report.findings.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn sound_images_are_clean_and_a_check_writes_nothing() {
        for format in [Format::Vhd, Format::Vhdx] {
            for kind in [ImageType::Dynamic, ImageType::Fixed] {
                let (report, _) = run(&image(format, Some(kind)), None);
                let what = format!("{format} {kind:?}: {report}");
                assert_eq!(report.status(), Status::Clean, "{what}");
                assert_eq!(report.corruptions + report.leaks, 0, "{what}");
                // In memory, pages of zeros count as holes: a fixed image is mostly holes.
                let sparse_fixed = report
                    .findings
                    .iter()
                    .any(|f| f.problem.contains("Hyper-V refuses a sparse fixed image"));
                assert_eq!(sparse_fixed, kind == ImageType::Fixed, "{what}");
                assert!(report.findings.iter().all(|f| f.severity == Severity::Info));
            }
        }
    }

    /// Damages a copy of a structure (`damage` returns where it lies), expects the check
    /// to name it and a repair to make the image clean with the same contents.
    fn damaged_copy(format: Format, structure: &str, damage: impl Fn(&mut Vec<u8>) -> u64) {
        let mut damaged = image(format, None);
        let before = contents(&damaged);
        let at = damage(&mut damaged);
        let (report, _) = run(&damaged, None);
        let what = format!("{structure}: {report}");
        assert_eq!(report.status(), Status::Corrupt, "{what}");
        let found = &report.findings[0];
        assert_eq!(
            (found.structure.as_str(), found.offset, &found.fix),
            (structure, Some(at), &Fix::RewriteCopy),
            "{what}"
        );
        let (repaired, after) = run(&damaged, Some(RepairLevel::Safe));
        assert_eq!(repaired.status(), Status::Clean, "{what}: {repaired}");
        assert!(!repaired.repaired.is_empty(), "{what}");
        assert!(contents(&after) == before, "{what}: contents changed");
        assert!(run(&after, None).0.findings.is_empty(), "{what}");
    }

    #[test]
    fn damaged_copies_are_found_and_written_again_from_the_good_one() {
        let flip = |at: u64| {
            move |image: &mut Vec<u8>| {
                image[at as usize] ^= 0x40;
                at / 0x10000 * 0x10000
            }
        };
        damaged_copy(Format::Vhd, "VHD footer copy", flip(100));
        // The trailing footer, damaged in place or cut off with the file's end.
        damaged_copy(Format::Vhd, "VHD footer", |image| {
            let last = image.len() - 512;
            image[last + 100] ^= 0x40;
            last as u64
        });
        damaged_copy(Format::Vhd, "VHD footer", |image| {
            image.truncate(image.len() - 512);
            image.len() as u64 - 512
        });
        damaged_copy(Format::Vhdx, "header 1", flip(0x10000 + 200));
        damaged_copy(Format::Vhdx, "header 2", flip(0x20000 + 4095));
        damaged_copy(Format::Vhdx, "region table 1", flip(0x30000 + 40));
        damaged_copy(Format::Vhdx, "region table 2", flip(0x40000 + 9));
        // A sound region table 2 that differs: its entries in the other order.
        damaged_copy(Format::Vhdx, "region table 2", |image| {
            let table = 0x40000;
            let mut entries = image[table + 16..table + 80].to_vec();
            entries.rotate_left(32);
            image[table + 16..table + 80].copy_from_slice(&entries);
            image[table + 4..table + 8].fill(0);
            let crc = crc32c::crc32c(&image[table..table + 0x10000]);
            image[table + 4..table + 8].copy_from_slice(&crc.to_le_bytes());
            table as u64
        });
    }

    /// Damages `image` with `damage`, expects the check to list `bad` BAT entries (in that
    /// order) and a `--repair=all` to make their blocks read as zeros and nothing else
    /// change; a plain `--repair` leaves them.
    fn bad_entries(format: Format, bad: &[u64], damage: impl Fn(&mut Vec<u8>)) {
        let mut damaged = image(format, None);
        let before = contents(&damaged);
        damage(&mut damaged);
        let (report, _) = run(&damaged, None);
        let what = format!("{format}: {report}");
        assert_eq!(report.status(), Status::Corrupt, "{what}");
        let expected: Vec<String> = bad.iter().map(|i| format!("BAT entry {i}")).collect();
        let corrupt: Vec<String> = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Corruption)
            .map(|f| f.structure.clone())
            .collect();
        assert_eq!(corrupt, expected, "{what}");
        let (safe, after_safe) = run(&damaged, Some(RepairLevel::Safe));
        assert_eq!(safe.status(), Status::Corrupt, "{what}");
        assert!(after_safe == damaged, "{what}: a safe repair gave up data");

        let (all, after) = run(&damaged, Some(RepairLevel::All));
        assert_eq!(all.status(), Status::Clean, "{what}: {all}");
        let mut expected = before;
        for g in &all.given_up {
            expected[g.disk_start as usize..g.disk_end as usize].fill(0);
        }
        let mut given_up: Vec<u64> = all.given_up.iter().map(|g| g.entry).collect();
        given_up.sort_unstable();
        let mut bad = bad.to_vec();
        bad.sort_unstable();
        assert_eq!(given_up, bad, "{what}");
        assert!(contents(&after) == expected, "{what}: other data changed");
    }

    fn vhd_entry(image: &[u8], index: u64) -> [u8; 4] {
        let at = (VHD_BAT + 4 * index) as usize;
        image[at..at + 4].try_into().unwrap()
    }

    fn vhdx_entry(image: &[u8], index: u64) -> u64 {
        let at = (VHDX_BAT + 8 * index) as usize;
        u64::from_le_bytes(image[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn every_bad_bat_entry_is_listed_and_given_up_only_with_repair_all() {
        // 512 KiB blocks; blocks 0, 6, 14 and 15 hold data.
        bad_entries(Format::Vhd, &[1, 3, 6, 0], |image| {
            patch(image, VHD_BAT + 4, &0xFFFF_FFF0u32.to_be_bytes());
            patch(image, VHD_BAT + 12, &1u32.to_be_bytes());
            let first = vhd_entry(image, 0);
            patch(image, VHD_BAT + 24, &first);
        });
        // 1 MiB blocks; blocks 0, 3 and 7 hold data.
        bad_entries(Format::Vhdx, &[1, 2, 3, 0, 7], |image| {
            patch(image, VHDX_BAT + 8, &((100 * MIB) | 6).to_le_bytes());
            patch(image, VHDX_BAT + 16, &((5 * MIB) | 4).to_le_bytes());
            let first = vhdx_entry(image, 0);
            patch(image, VHDX_BAT + 24, &first.to_le_bytes());
            // PARTIALLY_PRESENT in an image without a parent.
            let last = vhdx_entry(image, 7) | 7;
            patch(image, VHDX_BAT + 56, &last.to_le_bytes());
        });
    }

    /// Damages `image` so space is leaked, expects the check to say so (and only that)
    /// and a repair to give it back without changing the contents.
    fn leaked(format: Format, damage: impl Fn(&mut Vec<u8>)) -> (Vec<u8>, Vec<u8>) {
        let mut damaged = image(format, None);
        damage(&mut damaged);
        let (report, _) = run(&damaged, None);
        let what = format!("{format}: {report}");
        assert_eq!(report.status(), Status::Leaks, "{what}");
        assert!(
            report.findings.iter().all(|f| f.severity == Severity::Leak),
            "{what}"
        );
        let (repaired, after) = run(&damaged, Some(RepairLevel::Safe));
        assert_eq!(repaired.status(), Status::Clean, "{what}: {repaired}");
        assert!(
            contents(&after) == contents(&damaged),
            "{what}: contents changed"
        );
        (damaged, after)
    }

    #[test]
    fn leaked_space_is_reported_apart_and_given_back() {
        // A block no entry names any more, in the middle of the file.
        leaked(Format::Vhd, |image| {
            patch(image, VHD_BAT + 24, &[0xFF; 4]);
        });
        leaked(Format::Vhdx, |image| patch(image, VHDX_BAT + 24, &[0; 8]));
        // Data after the last block, before the footer: the file is cut after the blocks.
        let (damaged, after) = leaked(Format::Vhd, |image| {
            let footer = image.split_off(image.len() - 512);
            image.extend(std::iter::repeat_n(0xAB, MIB as usize));
            image.extend(footer);
        });
        assert_eq!(after.len() as u64, damaged.len() as u64 - MIB);
    }

    #[test]
    fn a_log_left_to_replay_is_reported_and_replayed() {
        let dirty = written(image(Format::Vhdx, None), &[(5 * MIB, 4096, 0x55)], false);
        let (report, _) = run(&dirty, None);
        assert_eq!(report.status(), Status::Clean, "{report}");
        assert_eq!(
            (report.findings.len(), &report.findings[0].fix),
            (1, &Fix::ReplayLog),
            "{report}"
        );
        assert!(
            listed(&report)[0].starts_with("log at 0x100000: holds "),
            "{report}"
        );
        let (repaired, after) = run(&dirty, Some(RepairLevel::Safe));
        assert_eq!(repaired.repaired, ["log replayed"]);
        assert!(repaired.findings.is_empty(), "{repaired}");
        assert!(contents(&after) == contents(&dirty));
    }

    #[test]
    fn text_names_each_problem_with_its_structure_offset_and_repair() {
        let mut damaged = image(Format::Vhd, None);
        patch(&mut damaged, VHD_BAT + 4, &0xFFFF_FFF0u32.to_be_bytes());
        damaged[100] ^= 1;
        let (report, _) = run(&damaged, None);
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("image: vhd (dynamic), 2.0 MiB file"),
            "{text}"
        );
        assert!(
            lines[1].starts_with(
                "corruption: BAT entry 1 at 0x604: block at offset 0x1ffffffe000 (524800 \
                 bytes) runs past the footer"
            ),
            "{text}"
        );
        assert!(
            lines[1].ends_with("[--repair=all makes the block read as zeros, giving up its data]")
        );
        assert!(lines[2].starts_with("corruption: VHD footer copy at 0x0: Checksum field"));
        assert!(lines[2].ends_with("[--repair rewrites it from the good copy]"));
        assert_eq!(lines[3], "image: 2 corruptions, 0 leaks");
        assert_eq!(report.status().exit_code(), 2);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["findings"][0]["offset"], 0x604);
        assert_eq!(json["findings"][0]["fix"]["action"], "give_up");
        assert_eq!(json["corruptions"], 2);
    }

    #[test]
    fn an_image_in_use_is_refused_naming_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.vhdx");
        std::fs::write(&path, image(Format::Vhdx, None)).unwrap();
        let writer = lock::ImageLock::acquire(&path, false).unwrap();
        for repair in [None, Some(RepairLevel::Safe)] {
            let err = check(&path, &CheckOptions { repair }).unwrap_err();
            assert!(matches!(err.kind(), ErrorKind::InUse(_)), "{err}");
            assert!(err.to_string().contains("image is in use"), "{err}");
        }
        drop(writer);
        let reader = lock::ImageLock::acquire(&path, true).unwrap();
        assert_eq!(
            check(&path, &CheckOptions::default()).unwrap().status(),
            Status::Clean
        );
        assert!(
            check(
                &path,
                &CheckOptions {
                    repair: Some(RepairLevel::Safe)
                }
            )
            .is_err()
        );
        drop(reader);
    }

    /// A parent and its child, made in a directory of the host and read into memory.
    struct Chain {
        dir: PathBuf,
        parent: Vec<u8>,
        child: Vec<u8>,
    }

    fn chain(format: Format) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        // The parent in a directory of its own: moved beside the child, every stored path
        // (a VHDX child stores only the relative one) leads elsewhere.
        std::fs::create_dir(dir.path().join("images")).unwrap();
        let (parent, child) = (
            dir.path().join(format!("images/parent.{}", ext(format))),
            dir.path().join(format!("child.{}", ext(format))),
        );
        std::fs::write(&parent, image(format, None)).unwrap();
        let options = CreateOptions {
            parent: Some(parent.clone()),
            block_size: Some(MIB as u32),
            ..CreateOptions::default()
        };
        create(&child, &options).unwrap();
        let disk = crate::open(&child, &OpenOptions::default()).unwrap();
        disk.write_at(&[0x77; 4096], MIB).unwrap();
        disk.close().unwrap();
        drop(disk);
        Chain {
            dir: dir.path().canonicalize().unwrap(),
            parent: std::fs::read(parent).unwrap(),
            child: std::fs::read(child).unwrap(),
        }
    }

    fn in_memory(path: &Path, files: &[(PathBuf, &[u8])]) -> ImageContext {
        let files = files
            .iter()
            .map(|(path, bytes)| {
                let file: Arc<dyn Storage> = Arc::new(MemStorage::from_vec(bytes.to_vec()));
                (path.clone(), file)
            })
            .collect();
        ImageContext::in_memory(path, files)
    }

    /// What the chain whose top is `child`, at `path`, reads with the images of `files`.
    fn chain_contents(path: &Path, child: MemStorage, files: &[(PathBuf, &[u8])]) -> Vec<u8> {
        let options = OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        };
        let disk = crate::open_storage_in(Box::new(child), &options, &in_memory(path, files))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut all = vec![0u8; disk.size() as usize];
        disk.read_at(&mut all, 0).unwrap();
        all
    }

    /// Checks `child` at `path`, with the images of `files` where they say.
    fn run_chain(
        path: &Path,
        child: &[u8],
        files: &[(PathBuf, &[u8])],
        repair: Option<RepairLevel>,
    ) -> (CheckReport, Vec<u8>) {
        let storage = Arc::new(MemStorage::from_vec(child.to_vec()));
        let context = in_memory(path, files);
        let options = CheckOptions { repair };
        let report = check_storage(path, storage.clone(), &context, &options).unwrap();
        (report, storage.contents())
    }

    #[test]
    fn the_link_to_the_parent_is_checked() {
        for format in [Format::Vhd, Format::Vhdx] {
            let c = chain(format);
            let name = |dir: &Path, what: &str| dir.join(format!("{what}.{}", ext(format)));
            let child_at = name(&c.dir, "child");
            // Where it was made: every stored path leads to the parent.
            let beside = [(name(&c.dir.join("images"), "parent"), c.parent.as_slice())];
            let (report, _) = run_chain(&child_at, &c.child, &beside, None);
            assert_eq!(report.findings, [], "{format}: {report}");
            // Both moved into one directory elsewhere: the parent is found beside the child,
            // by its file name; the stored paths are stale.
            let moved = Path::new("/vm");
            let (report, _) = run_chain(
                &name(moved, "child"),
                &c.child,
                &[(name(moved, "parent"), &c.parent)],
                None,
            );
            assert_eq!(report.status(), Status::Clean, "{format}: {report}");
            let found = &report.findings[0];
            assert_eq!(found.structure, "parent locator", "{format}: {report}");
            assert!(
                found.problem.contains("path") && found.problem.contains("leads elsewhere"),
                "{format}: {report}"
            );
            assert_eq!(
                found.fix,
                Fix::RewriteParentPaths {
                    parent: name(moved, "parent")
                }
            );
            // A repair writes the paths of where the parent is now, as a new child there
            // would store them, and the chain reads the same.
            let moved_files = [(name(moved, "parent"), c.parent.as_slice())];
            let before = chain_contents(
                &name(moved, "child"),
                MemStorage::from_vec(c.child.clone()),
                &moved_files,
            );
            let (repaired, child) = run_chain(
                &name(moved, "child"),
                &c.child,
                &moved_files,
                Some(RepairLevel::Safe),
            );
            assert_eq!(repaired.findings, [], "{format}: {repaired}");
            assert!(repaired.repaired[0].contains("parent."), "{repaired:?}");
            let (again, _) = run_chain(&name(moved, "child"), &child, &moved_files, None);
            assert_eq!(again.findings, [], "{format}: {again}");
            assert!(
                chain_contents(
                    &name(moved, "child"),
                    MemStorage::from_vec(child),
                    &moved_files
                ) == before,
                "{format}: the chain reads otherwise"
            );
            // The parent missing, or another image in its place.
            let other = image(format, None);
            for files in [
                vec![],
                vec![(name(&c.dir.join("images"), "parent"), other.as_slice())],
            ] {
                let (report, _) = run_chain(&child_at, &c.child, &files, None);
                assert_eq!(report.status(), Status::Corrupt, "{format}: {report}");
                assert_eq!(report.findings[0].structure, "parent link");
            }
        }
    }

    #[test]
    fn a_repair_cut_short_at_any_instant_leaves_an_image_that_reads_the_same() {
        let flip = |at: usize| move |image: &mut Vec<u8>| image[at] ^= 0x40;
        let dirty = |image: &mut Vec<u8>| {
            *image = written(image.clone(), &[(5 * MIB, 4096, 0x55)], false);
        };
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: [(Format, &str, Damage); 7] = [
            (Format::Vhd, "footer copy", Box::new(flip(100))),
            (
                Format::Vhd,
                "trailing footer",
                Box::new(|image: &mut Vec<u8>| image.truncate(image.len() - 512)),
            ),
            (
                Format::Vhd,
                "leak",
                Box::new(|image: &mut Vec<u8>| patch(image, VHD_BAT + 24, &[0xFF; 4])),
            ),
            (Format::Vhdx, "header", Box::new(flip(0x10000 + 77))),
            (Format::Vhdx, "region table", Box::new(flip(0x30000 + 77))),
            (Format::Vhdx, "dirty log", Box::new(dirty)),
            (
                Format::Vhdx,
                "leak",
                Box::new(|image: &mut Vec<u8>| patch(image, VHDX_BAT + 24, &[0; 8])),
            ),
        ];
        for (format, what, damage) in cases {
            let mut damaged = image(format, None);
            damage(&mut damaged);
            let before = contents(&damaged);
            let storage = Arc::new(Crashing::new(
                MemStorage::from_vec(damaged),
                move |crashed, state| {
                    let options = OpenOptions {
                        read_only: true,
                        ..OpenOptions::default()
                    };
                    let disk = crate::open_storage(Box::new(crashed), &options)
                        .unwrap_or_else(|e| panic!("{what}: {state}: {e}"));
                    let mut all = vec![0u8; disk.size() as usize];
                    disk.read_at(&mut all, 0).unwrap();
                    assert!(all == before, "{what}: {state} changed contents");
                },
            ));
            let report = check_storage(
                Path::new("image"),
                storage.clone(),
                &ImageContext::detached(),
                &CheckOptions {
                    repair: Some(RepairLevel::Safe),
                },
            )
            .unwrap();
            assert_eq!(report.status(), Status::Clean, "{format} {what}: {report}");
            assert!(
                storage.checked() > 3,
                "{format} {what}: {}",
                storage.checked()
            );
        }
    }

    #[test]
    fn a_parent_path_rewrite_cut_short_at_any_instant_leaves_a_chain_that_reads_the_same() {
        for format in [Format::Vhd, Format::Vhdx] {
            let c = chain(format);
            let (child_at, parent_at) = (
                PathBuf::from(format!("/vm/child.{}", ext(format))),
                PathBuf::from(format!("/vm/parent.{}", ext(format))),
            );
            let files = [(parent_at.clone(), c.parent.as_slice())];
            let before = chain_contents(&child_at, MemStorage::from_vec(c.child.clone()), &files);
            let (crash_child_at, parent) = (child_at.clone(), c.parent.clone());
            let storage = Arc::new(Crashing::new(
                MemStorage::from_vec(c.child),
                move |crashed, state| {
                    let files = [(parent_at.clone(), parent.as_slice())];
                    let found = chain_contents(&crash_child_at, crashed, &files);
                    assert!(found == before, "{format}: {state}");
                },
            ));
            let report = check_storage(
                &child_at,
                storage.clone(),
                &in_memory(&child_at, &files),
                &CheckOptions {
                    repair: Some(RepairLevel::Safe),
                },
            )
            .unwrap();
            assert_eq!(report.findings, [], "{format}: {report}");
            assert!(storage.checked() > 4, "{format}: {}", storage.checked());
        }
    }

    #[test]
    fn a_childs_block_given_up_reads_zeros_not_its_parent() {
        for format in [Format::Vhd, Format::Vhdx] {
            let c = chain(format);
            let child_at = c.dir.join(format!("child.{}", ext(format)));
            let files = [(
                c.dir.join(format!("images/parent.{}", ext(format))),
                c.parent.as_slice(),
            )];
            let before = chain_contents(&child_at, MemStorage::from_vec(c.child.clone()), &files);
            // The child's block 1 (1 MiB blocks), which it wrote, points past the end.
            let mut damaged = c.child.clone();
            match format {
                Format::Vhd => patch(&mut damaged, VHD_BAT + 4, &0xFFFF_FF00u32.to_be_bytes()),
                _ => patch(
                    &mut damaged,
                    VHDX_BAT + 8,
                    &((1 << 40) | 6u64).to_le_bytes(),
                ),
            }
            let (report, _) = run_chain(&child_at, &damaged, &files, None);
            assert_eq!(report.status(), Status::Corrupt, "{format}: {report}");
            let (repaired, after) = run_chain(&child_at, &damaged, &files, Some(RepairLevel::All));
            assert_eq!(repaired.status(), Status::Clean, "{format}: {repaired}");
            let mut expected = before;
            expected[MIB as usize..2 * MIB as usize].fill(0);
            assert!(
                chain_contents(&child_at, MemStorage::from_vec(after), &files) == expected,
                "{format}: the block given up does not read zeros"
            );
        }
    }

    #[test]
    fn bits_of_a_childs_not_present_block_are_cleared() {
        let c = chain(Format::Vhdx);
        let child_at = c.dir.join("child.vhdx");
        let files = [(c.dir.join("images/parent.vhdx"), c.parent.as_slice())];
        // Block 1, which the child wrote, made NOT_PRESENT: it reads the parent, its bits
        // stay set and its space is leaked.
        let mut damaged = c.child.clone();
        patch(&mut damaged, VHDX_BAT + 8, &[0; 8]);
        let before = chain_contents(&child_at, MemStorage::from_vec(damaged.clone()), &files);
        let (report, _) = run_chain(&child_at, &damaged, &files, None);
        assert_eq!(report.status(), Status::Corrupt, "{report}");
        assert_eq!(report.findings[0].structure, "sector bitmaps", "{report}");
        assert_eq!(report.findings[0].fix, Fix::ClearStaleBits);
        let (repaired, after) = run_chain(&child_at, &damaged, &files, Some(RepairLevel::Safe));
        assert_eq!(repaired.findings, [], "{repaired}");
        assert!(chain_contents(&child_at, MemStorage::from_vec(after), &files) == before);
    }
}
