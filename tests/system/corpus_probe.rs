//! Every corpus image is recognised by its signature, whatever its name.

use crate::common;
use vdisk_mount::{Format, storage::FileStorage};

#[test]
fn corpus_images_probe_by_signature() {
    let Some(corpus) = common::corpus_dir() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let names = common::corpus_images(&corpus, "");
    assert!(names.len() >= 10, "corpus lists only {names:?}");
    for name in names {
        let path = common::decompress_corpus_image(&corpus, &name, dir.path());
        // Renamed to hide the extension: probing must not look at names.
        let hidden = dir.path().join("image.bin");
        std::fs::rename(&path, &hidden).unwrap();
        let storage = FileStorage::new(std::fs::File::open(&hidden).unwrap());
        let expected = if name.ends_with(".vhdx") {
            Format::Vhdx
        } else {
            Format::Vhd
        };
        assert_eq!(
            vdisk_mount::open::probe(&storage).unwrap(),
            expected,
            "{name}"
        );
        std::fs::remove_file(&hidden).unwrap();
    }
}
