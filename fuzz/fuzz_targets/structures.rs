//! The VHD footer, dynamic header and parent locator parsers, and the VHDX header, region
//! table, metadata table and parent locator parsers, each on fuzzer bytes alone.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vdisk_mount::vhd::fuzzing::parse_structures(data);
    vdisk_mount::vhdx::fuzzing::parse_structures(data);
});
