//! The VHDX log scan on its own: fuzzer bytes as a LogGuid and a log ring.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vdisk_mount::vhdx::fuzzing::scan_log(data);
});
