//! The nbdkit plugin (`nbdkit-vdisk/`), served by nbdkit on a Unix socket and used by
//! independent NBD clients: qemu-img and qemu-io (qemu's NBD client), nbdinfo and nbdcopy
//! (libnbd). What they read is checked against qemu-img's own reading of the image file,
//! the corpus digests or vhdimount; what they write against a model, `qemu-img check` and
//! qemu reading the file afterwards.
//!
//! The plugin is a crate of its own, which `cargo test` does not build: the first test to
//! need it builds it (`common::nbd::plugin`).

use crate::common::chain::{self, MIB};
use crate::common::mount::{self, qemu_image_with_patterns, vhdx_log_guid};
use crate::common::nbd::{plugin, tools_available};
use crate::common::vdisk::vdisk_ok;
use crate::common::{self, qemu_img, qemu_io, run};
use crate::service_lock::{
    QemuIo, assert_mount_refused, assert_qemu_refused, qemu_io_read, qemu_io_write, qemu_vhdx,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// nbdkit serving one image through the plugin, in the foreground (so its pid is the
/// server's), on a socket of its own. Killed if a test fails while it runs.
struct Nbdkit {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Nbdkit {
    /// Starts serving `image` with the plugin's `params`, or returns what nbdkit said when
    /// it would not.
    fn try_start(image: &Path, params: &[&str]) -> Result<Nbdkit, String> {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("nbdkit")
            .arg("-f")
            .arg("-U")
            .arg(dir.path().join("socket"))
            .arg(plugin())
            .arg(format!("image={}", image.display()))
            .args(params)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("cannot run nbdkit");
        let mut server = Nbdkit {
            child: Some(child),
            dir,
        };
        let start = Instant::now();
        loop {
            if let Some(status) = server.child().try_wait().unwrap() {
                server.child = None;
                return Err(format!("nbdkit exited ({status}): {}", server.log()));
            }
            let probe = Command::new("nbdinfo")
                .args(["--size", &server.uri()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            if probe.success() {
                return Ok(server);
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "nbdkit did not serve {}: {}",
                image.display(),
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start(image: &Path, params: &[&str]) -> Nbdkit {
        Self::try_start(image, params).unwrap_or_else(|e| panic!("{}: {e}", image.display()))
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("nbdkit is running")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn uri(&self) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.dir.path().join("socket").display()
        )
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("nbdkit is running").id()
    }

    fn signal(mut self, signal: libc::c_int) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("nbdkit is running");
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        child.wait().unwrap()
    }

    /// Shuts nbdkit down as a service manager would (SIGTERM): it closes the image.
    fn stop(self) {
        let log = self.log();
        let status = self.signal(libc::SIGTERM);
        assert!(status.success(), "nbdkit exited with {status}: {log}");
    }

    /// SIGKILL: the image is left as the instant found it.
    fn kill(self) {
        self.signal(libc::SIGKILL);
    }
}

impl Drop for Nbdkit {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// qemu-io on the export, as a raw disk; its output must not report a failure.
fn qemu_io_nbd(server: &Nbdkit, options: &[&str], commands: &[&str]) -> Output {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]).args(options);
    for c in commands {
        command.args(["-c", c]);
    }
    let out = run(command.arg(server.uri()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("failed"), "qemu-io {commands:?}: {stdout}");
    out
}

/// `qemu-img create -f FORMAT -o OPTIONS PATH SIZE`.
fn qemu_create(format: &str, options: &str, path: &Path, size: &str) {
    qemu_img(&[
        "create",
        "-f",
        format,
        "-o",
        options,
        path.to_str().unwrap(),
        size,
    ]);
}

/// `qemu-img compare` of the export with a raw file.
fn compare_export(server: &Nbdkit, raw: &Path) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &server.uri()])
        .arg(raw));
}

/// `image` with `suffix` added to its name.
fn beside(image: &Path, suffix: &str) -> PathBuf {
    let mut path = image.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// The image as qemu-img reads it, converted to a raw file beside it.
fn qemu_raw(image: &Path) -> PathBuf {
    let raw = beside(image, ".qemu.raw");
    common::qemu_convert_to_raw(common::qemu_format(image), image, &raw);
    raw
}

/// How a reference reader turns an image into a raw file of its disk.
type Reference = fn(&Path) -> PathBuf;

/// The image as libvhdi's vhdimount reads it (where qemu cannot), in a raw file beside it.
fn vhdimount_raw(image: &Path) -> PathBuf {
    let raw = beside(image, ".vhdi.raw");
    std::fs::write(&raw, common::vhdimount_read(image)).unwrap();
    raw
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn every_kind_of_image_reads_over_nbd_as_qemu_reads_it() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut images: Vec<(PathBuf, Reference)> = [
        ("dyn.vhd", "vpc", "subformat=dynamic", 2 * MIB),
        ("fixed.vhd", "vpc", "subformat=fixed", 2 * MIB),
        ("dyn.vhdx", "vhdx", "block_size=1M", MIB),
    ]
    .into_iter()
    .map(|(name, format, options, block)| {
        let image = qemu_image_with_patterns(d, name, format, options, 64 * MIB, block);
        (image, qemu_raw as Reference)
    })
    .collect();
    // 4096-byte logical sectors, written through our own driver: qemu cannot read them,
    // libvhdi can.
    let sector_4k = d.join("4k.vhdx");
    vdisk_ok(&[
        "create",
        "--logical-sector",
        "4096",
        "--block-size",
        "1M",
        "--size",
        "64M",
        sector_4k.to_str().unwrap(),
    ]);
    chain::write_directly(
        &sector_4k,
        &[(4096, vec![0x4a; 8192]), (MIB - 4096, vec![0x4b; 3 * 4096])],
    );
    images.push((sector_4k, vhdimount_raw));
    for (image, reference) in images {
        let raw = reference(&image);
        let server = Nbdkit::start(&image, &[]);
        let info = run(Command::new("nbdinfo").args(["--json", &server.uri()]));
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let export = &info["exports"][0];
        assert_eq!(
            export["export-size"],
            std::fs::metadata(&raw).unwrap().len()
        );
        assert_eq!(export["can_multi_conn"], true, "{}", image.display());
        compare_export(&server, &raw);
        // nbdcopy reads with its own client, skipping what the extents call holes.
        let copy = d.join("copy.raw");
        run(Command::new("nbdcopy").arg(server.uri()).arg(&copy));
        run(Command::new("cmp").arg(&copy).arg(&raw));
        server.stop();
    }
}

#[test]
fn a_dirty_vhdx_served_read_only_reads_replayed_and_stays_unchanged() {
    if !tools_available() {
        return;
    }
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let name = "discutils__vhdx-log-replay__win10-15063-dirtylog.vhdx";
    let image = common::decompress_corpus_image(&corpus, name, dir.path());
    let before = common::sha256_file(&image);
    let server = Nbdkit::start(&image, &["readonly=1"]);
    let copy = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(server.uri()).arg(&copy));
    assert_eq!(
        common::sha256_file(&copy),
        common::expected_sha256(&corpus, &format!("{name}.raw"))
    );
    // A read-only export refuses writes.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512", &server.uri()])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("wrote"));
    server.stop();
    assert_eq!(common::sha256_file(&image), before, "the image changed");
    assert_ne!(
        vhdx_log_guid(&image),
        [0; 16],
        "the log was replayed into the file"
    );
}

/// Writes `writes` into the image at `path` through the plugin, with qemu-io taking each
/// from a file.
fn write_over_nbd(path: &Path, writes: &chain::Writes) {
    let server = Nbdkit::start(path, &[]);
    let scratch = tempfile::NamedTempFile::new().unwrap();
    for (offset, data) in writes {
        std::fs::write(scratch.path(), data).unwrap();
        qemu_io_nbd(
            &server,
            &[],
            &[&format!(
                "write -s {} {offset} {}",
                scratch.path().display(),
                data.len()
            )],
        );
    }
    server.stop();
}

#[test]
fn chains_of_both_formats_are_written_and_read_over_nbd() {
    if !tools_available() {
        return;
    }
    for (seed, (name, format, options)) in [
        ("base.vhd", "vpc", "subformat=dynamic"),
        ("base.vhdx", "vhdx", "block_size=1M"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let base = qemu_image_with_patterns(dir.path(), name, format, options, 16 * MIB, MIB);
        // Every level written over NBD while it is the top, then checked against its model
        // and vhdimount (qemu reads neither format's differencing images).
        let levels = chain::check_chain(dir.path(), &base, 3, 40 + seed as u64, &write_over_nbd);
        for (level, model) in &levels {
            let raw = beside(level, ".model.raw");
            std::fs::write(&raw, model).unwrap();
            let server = Nbdkit::start(level, &["readonly=1"]);
            compare_export(&server, &raw);
            server.stop();
        }
    }
}

/// A write of `pattern` over `[offset, offset + len)` (zeros for `-z`, qemu-io's zeroing
/// write), as a qemu-io command and in the model.
fn pattern_write(model: &mut [u8], offset: u64, len: u64, pattern: u8, flags: &str) -> String {
    let range = offset as usize..(offset + len) as usize;
    if flags.contains("-z") {
        model[range].fill(0);
        format!("write {flags} {offset} {len}")
    } else {
        model[range].fill(pattern);
        format!("write {flags} -P {pattern:#x} {offset} {len}")
    }
}

#[test]
fn writes_zeroes_and_flushes_over_nbd_land_in_the_image() {
    if !tools_available() {
        return;
    }
    for (name, format, options, block) in [
        ("dyn.vhdx", "vhdx", "block_size=1M", MIB),
        ("dyn.vhd", "vpc", "subformat=dynamic", 2 * MIB),
        (
            "fixed.vhdx",
            "vhdx",
            "subformat=fixed,block_size=1M,block_state_zero=off",
            MIB,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(name);
        qemu_create(format, options, &image, "32M");
        let size = common::qemu_virtual_size(&format!(
            "driver={format},file.filename={}",
            image.display()
        ));
        let mut model = vec![0u8; size as usize];
        let mut rng = StdRng::seed_from_u64(7);
        let mut commands = Vec::new();
        for i in 0..40u64 {
            let len = match i % 4 {
                0 => rng.random_range(1..512),
                1 => rng.random_range(512..64 * 1024),
                2 => rng.random_range(block - 4096..block + 4096),
                _ => rng.random_range(1..3 * MIB),
            }
            .min(size);
            let offset = rng.random_range(0..=size - len);
            // Some with FUA, some as zeroing: written zeros, or holes where allowed.
            let flags = ["", "-f", "-z", "-z -u"][i as usize % 4];
            let pattern = (i as u8).wrapping_mul(37) | 1;
            commands.push(pattern_write(&mut model, offset, len, pattern, flags));
        }
        commands.push("flush".to_string());
        let server = Nbdkit::start(&image, &[]);
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io_nbd(&server, &[], &commands);
        server.stop();
        if format == "vhdx" {
            assert_eq!(
                vhdx_log_guid(&image),
                [0; 16],
                "{name}: the log is not empty"
            );
        }
        common::qemu_check_clean(format, &image);
        let raw = dir.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        common::qemu_compare_with_raw(format, &image, &raw);
    }
}

/// `vdisk map --json` of `image`, as (start, length, data?) with neighbours of one state
/// merged.
fn vdisk_map(image: &Path) -> Vec<(u64, u64, bool)> {
    let map: serde_json::Value =
        serde_json::from_str(&vdisk_ok(&["map", "--json", image.to_str().unwrap()])).unwrap();
    let extents = map["extents"].as_array().unwrap().iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["state"] == "data",
        )
    });
    merged(extents)
}

/// `nbdinfo --map` of the export, in the same form: type 0 is data, the rest (our plugin
/// reports only hole|zero, 3) reads as zeros.
fn nbdinfo_map(server: &Nbdkit) -> Vec<(u64, u64, bool)> {
    let out = run(Command::new("nbdinfo").args(["--map", &server.uri()]));
    let text = String::from_utf8(out.stdout).unwrap();
    merged(text.lines().map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let number = |i: usize| fields[i].parse::<u64>().unwrap();
        (number(0), number(1), number(2) == 0)
    }))
}

fn merged(extents: impl Iterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (start, len, data) in extents {
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len, data)),
        }
    }
    out
}

#[test]
fn trims_over_nbd_free_blocks_and_the_map_is_vdisk_maps() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    qemu_create("vhdx", "block_size=1M", &base, "32M");
    let server = Nbdkit::start(&base, &[]);
    qemu_io_nbd(&server, &[], &["write -P 0x5c 0 32M", "flush"]);
    let full = allocated(&base);
    // Whole blocks 4 to 11 go back, a ragged range around block 20 reads as zeros.
    qemu_io_nbd(
        &server,
        &[],
        &["discard 4M 8M", "discard 20971000 1100000", "flush"],
    );
    qemu_io_nbd(
        &server,
        &["-r"],
        &[
            "read -P 0 4M 8M",
            "read -P 0x5c 0 4M",
            "read -P 0 20971520 1048576",
        ],
    );
    let served_map = nbdinfo_map(&server);
    server.stop();
    assert!(
        allocated(&base) + 8 * MIB <= full,
        "8 MiB trimmed, but the file went from {full} to {} bytes",
        allocated(&base)
    );
    assert_eq!(served_map, vdisk_map(&base));
    assert!(
        served_map.contains(&(4 * MIB, 8 * MIB, false)),
        "{served_map:?}"
    );
    common::qemu_check_clean("vhdx", &base);

    // A child shows its parent's data as data, as `vdisk map` does.
    let child = dir.path().join("child.vhdx");
    chain::child_of(&base, &child);
    let server = Nbdkit::start(&child, &[]);
    qemu_io_nbd(&server, &[], &["write -P 0x7e 5M 100k", "discard 0 1M"]);
    let served_map = nbdinfo_map(&server);
    server.stop();
    assert_eq!(served_map, vdisk_map(&child));
    assert!(
        served_map
            .iter()
            .any(|&(start, len, data)| data && start <= MIB && start + len >= 4 * MIB),
        "the parent's data is not data: {served_map:?}"
    );
}

#[test]
fn fast_zeroes_are_offered_only_where_they_are_fast() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("dyn.vhdx");
    qemu_create("vhdx", "block_size=1M", &image, "16M");
    let server = Nbdkit::start(&image, &[]);
    // -n: a zeroing that may not fall back to writing zeros; -u lets it unmap.
    qemu_io_nbd(
        &server,
        &[],
        &["write -P 0x21 0 16M", "write -z -u -n 0 8M"],
    );
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -z -n 8M 1M", &server.uri()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("failed"),
        "a zeroing that must allocate was called fast"
    );
    qemu_io_nbd(&server, &["-r"], &["read -P 0 0 8M", "read -P 0x21 8M 8M"]);
    server.stop();

    // A fixed image zeroes by writing zeros: nbdkit is told it has no fast zeroing.
    let fixed = dir.path().join("fixed.vhdx");
    qemu_create("vhdx", "subformat=fixed", &fixed, "8M");
    let server = Nbdkit::start(&fixed, &[]);
    let info = run(Command::new("nbdinfo").args(["--json", &server.uri()]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["can_fast_zero"], false);
    server.stop();
}

#[test]
fn four_clients_write_side_by_side_and_one_flush_makes_it_all_durable() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("shared.vhdx");
    qemu_create("vhdx", "block_size=1M", &image, "64M");
    let quarter = 16 * MIB;
    let mut model = vec![0u8; 4 * quarter as usize];
    let server = Nbdkit::start(&image, &[]);
    // Each client writes ragged pieces of its own quarter; `-t unsafe` keeps qemu from
    // flushing, so only the last client's flush can make them durable.
    let clients: Vec<Child> = (0..4u64)
        .map(|client| {
            let mut command = Command::new("qemu-io");
            command.args(["-f", "raw", "-t", "unsafe"]);
            let mut at = client * quarter + client * 777;
            let mut piece = 0u64;
            while at < (client + 1) * quarter {
                let len = (100_000 + piece * 4099).min((client + 1) * quarter - at);
                let pattern = (client * 64 + piece % 60 + 1) as u8;
                command.args(["-c", &pattern_write(&mut model, at, len, pattern, "")]);
                at += len + 512;
                piece += 1;
            }
            command
                .arg(server.uri())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut client in clients {
        assert!(client.wait().unwrap().success());
    }
    qemu_io_nbd(&server, &[], &["flush"]);
    // No shutdown: only what the flush made durable is in the file.
    server.kill();
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    let server = Nbdkit::start(&image, &[]);
    compare_export(&server, &raw);
    server.stop();
    common::qemu_check_clean("vhdx", &image);
    common::qemu_compare_with_raw("vhdx", &image, &raw);
}

/// A write the crash test makes: where, and with which pattern.
#[derive(Clone, Copy)]
struct Written {
    offset: u64,
    len: u64,
    pattern: u8,
}

/// How many times the crash test kills nbdkit.
const KILLS: usize = 4;

#[test]
fn a_killed_server_leaves_every_flushed_write() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("crash.vhdx");
    let size = 64 * MIB;
    qemu_create("vhdx", "block_size=1M", &image, "64M");
    let mut rng = StdRng::seed_from_u64(11);
    // Writes never overlap, so each acknowledged one must read back exactly.
    let mut next_free = 0u64;
    let mut acknowledged: Vec<Written> = Vec::new();
    // Each round writes a few MiB (the regions it planned but never reached stay unused),
    // so every round's kill lands on an image that went through the kills before it.
    for _ in 0..KILLS {
        let server = Nbdkit::start(&image, &[]);
        let uri = server.uri();
        let done = Arc::new(Mutex::new(Vec::new()));
        let mut plan = Vec::new();
        while next_free < size && plan.len() < 30 {
            let offset = next_free + rng.random_range(0..64 * 1024);
            let len = rng
                .random_range(1..256 * 1024)
                .min(size.saturating_sub(offset));
            if len == 0 {
                break;
            }
            plan.push(Written {
                offset,
                len,
                pattern: rng.random_range(1..=255),
            });
            next_free = offset + len;
        }
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                for w in plan {
                    let status = Command::new("qemu-io")
                        .args(["-f", "raw"])
                        .args([
                            "-c",
                            &format!("write -P {} {} {}", w.pattern, w.offset, w.len),
                        ])
                        .args(["-c", "flush", &uri])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .unwrap();
                    if !status.success() {
                        return;
                    }
                    done.lock().unwrap().push(w);
                }
            })
        };
        // The kill lands at a random instant once the writer got going.
        let start = Instant::now();
        while done.lock().unwrap().is_empty() && !writer.is_finished() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no write finished"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !done.lock().unwrap().is_empty(),
            "the writer failed before any kill"
        );
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1000)));
        server.kill();
        writer.join().unwrap();
        acknowledged.extend(done.lock().unwrap().iter().copied());
        // Serving again replays what the log holds.
        let server = Nbdkit::start(&image, &[]);
        let reads: Vec<String> = acknowledged
            .iter()
            .map(|w| format!("read -P {} {} {}", w.pattern, w.offset, w.len))
            .collect();
        let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
        qemu_io_nbd(&server, &["-r"], &reads);
        server.stop();
        if next_free >= size {
            break;
        }
    }
    common::qemu_check_clean("vhdx", &image);
    let reads: Vec<String> = acknowledged
        .iter()
        .map(|w| format!("read -P {} {} {}", w.pattern, w.offset, w.len))
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io("vhdx", &image, &reads);
}

#[test]
fn a_served_image_keeps_qemu_and_mounts_out_and_the_reverse() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_vhdx(dir.path());
    let server = Nbdkit::start(&image, &[]);
    assert_qemu_refused(&qemu_io_write(&image), "Failed to get \"write\" lock");
    assert_qemu_refused(&qemu_io_read(&image), "Failed to get shared \"write\" lock");
    if mount::fuse_available() {
        assert_mount_refused(&image, &["ro"], server.pid());
    }
    let refused = Nbdkit::try_start(&image, &["readonly=1"]).err().unwrap();
    let holder = format!(
        "{}: image is in use (pid {})",
        image.display(),
        server.pid()
    );
    assert!(refused.contains(&holder), "{refused}");
    server.stop();

    let server = Nbdkit::start(&image, &["readonly=1"]);
    assert!(qemu_io_read(&image).status.success());
    assert_qemu_refused(&qemu_io_write(&image), "Failed to get \"write\" lock");
    Nbdkit::start(&image, &["readonly=1"]).stop();
    server.stop();

    let qemu = QemuIo::open(&image, false);
    let refused = Nbdkit::try_start(&image, &[]).err().unwrap();
    let holder = format!("{}: image is in use (pid {})", image.display(), qemu.pid());
    assert!(refused.contains(&holder), "{refused}");
}

#[test]
fn bad_parameters_and_images_are_refused_by_name() {
    if !tools_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a disk image").unwrap();
    for (params, needle) in [
        (&["format=qcow2"][..], "unknown format 'qcow2'"),
        (&["discard=trim"], "expected ignore, zero or unmap"),
        (&["bogus=1"], "unknown parameter 'bogus=1'"),
        (&[], "notes.txt"),
    ] {
        let refused = Nbdkit::try_start(&text, params).err().unwrap();
        assert!(refused.contains(needle), "{params:?}: {refused}");
        assert!(!refused.contains("panicked"), "{refused}");
    }
}
