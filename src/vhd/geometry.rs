//! CHS geometry stored in the footer (FORMATS.md §8.12) and the rule that decides whether
//! the disk size comes from it or from the footer's Current Size (§8.13).

use crate::disk::VhdSizeRule;

/// Cylinders × heads × sectors per track, as in footer bytes 56..60.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The largest geometry the format can express (~127.5 GiB). Creators store it for
    /// anything bigger, so it never tells the real size.
    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// Geometry for a disk of `size` bytes by the specification's algorithm; its capacity
    /// is usually a little smaller than `size`.
    pub fn for_size(size: u64) -> Geometry {
        let total = (size / 512).min(65535 * 16 * 255);
        let (sectors_per_track, heads, cylinders_times_heads) = if total >= 65535 * 16 * 63 {
            (255, 16, total / 255)
        } else {
            let mut spt = 17;
            let mut cyl_x_heads = total / spt;
            let mut heads = cyl_x_heads.div_ceil(1024).max(4);
            if cyl_x_heads >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cyl_x_heads = total / spt;
            }
            if cyl_x_heads >= heads * 1024 {
                spt = 63;
                heads = 16;
                cyl_x_heads = total / spt;
            }
            (spt, heads, cyl_x_heads)
        };
        // The clamp above keeps every factor inside its field.
        Geometry {
            cylinders: (cylinders_times_heads / heads) as u16,
            heads: heads as u8,
            sectors_per_track: sectors_per_track as u8,
        }
    }

    /// The geometry of the smallest disk of at least `size` bytes that a geometry
    /// describes exactly ([`Geometry::for_size`] of that size gives it back), or the
    /// largest geometry past their reach: the sizes a disk read by its geometry can have.
    /// Exact, so a size it gave gives the same geometry again.
    pub fn covering(size: u64) -> Geometry {
        let mut sectors = size.div_ceil(512);
        loop {
            // Every whole cylinder (at most 16 × 255 sectors) is exact, so this ends
            // within a few thousand steps.
            let geometry = Geometry::for_size(sectors * 512);
            if geometry.bytes() == sectors * 512 || geometry == Geometry::MAX {
                return geometry;
            }
            sectors += 1;
        }
    }

    /// Disk capacity the geometry describes, in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track) * 512
    }
}

/// Which footer field gives the disk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeSource {
    Geometry,
    CurrentSize,
}

/// Decides the size source the way qemu does, so both read the same disk: Virtual PC
/// (`vpc `) and classic qemu (`qemu`) images are sized by geometry, every other creator by
/// Current Size. A maximal geometry cannot describe the disk, so Current Size wins then
/// even when geometry is forced.
pub fn size_source(creator_app: &[u8; 4], geometry: Geometry, rule: VhdSizeRule) -> SizeSource {
    if geometry == Geometry::MAX {
        return SizeSource::CurrentSize;
    }
    match rule {
        VhdSizeRule::Chs => SizeSource::Geometry,
        VhdSizeRule::CurrentSize => SizeSource::CurrentSize,
        VhdSizeRule::Auto if matches!(creator_app, b"vpc " | b"qemu") => SizeSource::Geometry,
        VhdSizeRule::Auto => SizeSource::CurrentSize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn chs(c: u16, h: u8, s: u8) -> Geometry {
        Geometry {
            cylinders: c,
            heads: h,
            sectors_per_track: s,
        }
    }

    #[test]
    fn geometry_matches_the_reference_examples() {
        assert_eq!(Geometry::for_size(20 * MIB), chs(602, 4, 17));
        assert_eq!(Geometry::for_size(20 * MIB).bytes(), 20_959_232);
        assert_eq!(Geometry::for_size(GIB), chs(2080, 16, 63));
        assert_eq!(Geometry::for_size(GIB).bytes(), 1_073_479_680);
        assert_eq!(Geometry::for_size(5 * GIB), chs(10402, 16, 63));
        assert_eq!(Geometry::for_size(5 * GIB).bytes(), 5_368_430_592);
        assert_eq!(Geometry::for_size(200 * GIB), Geometry::MAX);
        assert_eq!(Geometry::MAX.bytes(), 136_899_993_600);
    }

    #[test]
    fn geometry_matches_images_made_by_other_tools() {
        // Geometries found in footers written by qemu-img, Hyper-V and Windows diskpart.
        assert_eq!(Geometry::for_size(4_212_736), chs(121, 4, 17));
        assert_eq!(Geometry::for_size(104_448), chs(3, 4, 17));
        assert_eq!(Geometry::for_size(4 * MIB), chs(120, 4, 17));
        assert_eq!(Geometry::for_size(136_365_211_648), chs(65278, 16, 255));
        assert_eq!(Geometry::for_size(0), chs(0, 4, 17));
    }

    #[test]
    fn covering_geometries_are_exact_and_hold_the_size_within_a_cylinder() {
        for size in [
            512,
            4_212_736,
            20 * MIB,
            20 * MIB + 512,
            GIB,
            5 * GIB + 12345 * 512,
        ] {
            let g = Geometry::covering(size);
            assert!(g.bytes() >= size, "{size}: {g:?}");
            assert!(g.bytes() - size < 16 * 255 * 512, "{size}: {g:?}");
            assert_eq!(Geometry::for_size(g.bytes()), g, "{size}: not exact");
            assert_eq!(Geometry::covering(g.bytes()), g, "{size}: not stable");
        }
        assert_eq!(Geometry::covering(4_212_736), chs(121, 4, 17));
        assert_eq!(Geometry::covering(20 * MIB), chs(603, 4, 17));
        assert_eq!(Geometry::covering(200 * GIB), Geometry::MAX);
    }

    #[test]
    fn size_source_follows_the_creator_unless_forced() {
        let g = chs(602, 4, 17);
        for app in [b"vpc ", b"qemu"] {
            assert_eq!(size_source(app, g, VhdSizeRule::Auto), SizeSource::Geometry);
        }
        for app in [
            b"win ", b"qem2", b"d2v ", b"d2v\0", b"tap\0", b"CTXS", b"wa\0\0", b"vs  ",
        ] {
            assert_eq!(
                size_source(app, g, VhdSizeRule::Auto),
                SizeSource::CurrentSize
            );
        }
        assert_eq!(
            size_source(b"win ", g, VhdSizeRule::Chs),
            SizeSource::Geometry
        );
        assert_eq!(
            size_source(b"vpc ", g, VhdSizeRule::CurrentSize),
            SizeSource::CurrentSize
        );
        assert_eq!(
            size_source(b"vpc ", Geometry::MAX, VhdSizeRule::Chs),
            SizeSource::CurrentSize
        );
    }
}
