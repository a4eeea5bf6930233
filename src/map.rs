//! `vdisk map`: which image of a chain holds each extent of the virtual disk, and where
//! in its file; like `qemu-img map`, but naming the layer of a differencing chain.

use crate::chain::open_layered;
use crate::disk::OpenOptions;
use crate::error::Result;
use crate::layer::{ChainRun, Layer, Source, chain_map, push_chain_run};
use serde::Serialize;
use std::fmt;
use std::path::Path;

/// Most of the disk mapped by one walk of the chain: the runs of one window are held at
/// once, so a huge sparse disk is mapped in pieces.
const WINDOW: u64 = 1 << 36;

/// The extents of an image's virtual disk, each with the file it comes from.
#[derive(Debug, Clone, Serialize)]
pub struct ImageMap {
    /// The image (0) and its parents, top down.
    pub layers: Vec<String>,
    pub extents: Vec<MapExtent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapExtent {
    pub start: u64,
    pub length: u64,
    /// `data`: read from `layer`'s file at `offset`; `zero`: reads as zeros, because
    /// `layer` says so or the range lies past its end.
    pub state: &'static str,
    pub layer: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Maps the image at `path`, opened read-only with its chain of parents.
pub fn image_map(path: &Path, options: &OpenOptions) -> Result<ImageMap> {
    let options = OpenOptions {
        read_only: true,
        ..options.clone()
    };
    let top = open_layered(path, &options)?;
    map_layer(path, top.as_ref()).map_err(|e| e.with_file(path))
}

fn map_layer(path: &Path, top: &dyn Layer) -> Result<ImageMap> {
    let mut layers = vec![path.display().to_string()];
    let mut level = top;
    while let Some(parent) = level.parent_layer() {
        layers.push(parent.path.display().to_string());
        level = parent.layer.as_ref();
    }
    let mut runs: Vec<ChainRun> = Vec::new();
    let mut at = 0;
    while at < top.size() {
        let len = (top.size() - at).min(WINDOW);
        for run in chain_map(top, at, len)? {
            push_chain_run(&mut runs, run.offset, run.len, run.source);
        }
        at += len;
    }
    let extents = runs
        .into_iter()
        .map(|run| {
            let (state, layer, offset) = match run.source {
                Source::File { level, file_offset } => ("data", level, Some(file_offset)),
                Source::Zero { level } => ("zero", level, None),
            };
            MapExtent {
                start: run.offset,
                length: run.len,
                state,
                layer,
                offset,
            }
        })
        .collect();
    Ok(ImageMap { layers, extents })
}

impl fmt::Display for ImageMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<18} {:<18} {:<6} {:<18} File",
            "Offset", "Length", "State", "Mapped to"
        )?;
        for e in &self.extents {
            let mapped = e.offset.map_or("-".to_string(), |o| format!("{o:#x}"));
            // Past the bottom image's end there is no file to name.
            let file = self.layers.get(e.layer).map_or("-", String::as_str);
            writeln!(
                f,
                "{:<18} {:<18} {:<6} {:<18} {file}",
                format!("{:#x}", e.start),
                format!("{:#x}", e.length),
                e.state,
                mapped
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{CreateOptions, create};

    #[test]
    fn a_child_maps_its_own_data_its_parents_and_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (base, child) = (dir.path().join("base.vhdx"), dir.path().join("child.vhdx"));
        let mib = 1u64 << 20;
        create(
            &base,
            &CreateOptions {
                size: Some(8 * mib),
                block_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let disk = crate::open(&base, &OpenOptions::default()).unwrap();
        disk.write_at(&[1; 4096], 2 * mib).unwrap();
        disk.close().unwrap();
        drop(disk);
        create(
            &child,
            &CreateOptions {
                parent: Some(base.clone()),
                block_size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let disk = crate::open(&child, &OpenOptions::default()).unwrap();
        disk.write_at(&[2; 4096], 5 * mib).unwrap();
        disk.close().unwrap();
        drop(disk);

        let map = image_map(&child, &OpenOptions::default()).unwrap();
        assert_eq!(map.layers.len(), 2);
        assert!(map.layers[1].ends_with("base.vhdx"), "{:?}", map.layers);
        let kib = 1 << 10;
        let summary: Vec<(u64, u64, &str, usize)> = map
            .extents
            .iter()
            .map(|e| (e.start / kib, e.length / kib, e.state, e.layer))
            .collect();
        // A base block holds all of itself; a child only the sectors it wrote, and around
        // them its parent answers.
        assert_eq!(
            summary,
            [
                (0, 2048, "zero", 1),
                (2048, 1024, "data", 1),
                (3072, 2048, "zero", 1),
                (5120, 4, "data", 0),
                (5124, 3068, "zero", 1),
            ]
        );
        let text = map.to_string();
        assert!(
            text.lines().nth(4).unwrap().ends_with("child.vhdx"),
            "{text}"
        );
        let json = serde_json::to_value(&map).unwrap();
        assert_eq!(json["extents"][1]["state"], "data");
        assert!(json["extents"][0].get("offset").is_none());
    }
}
