//! The master boot record in sector 0 and the extended boot records (EBRs) chained
//! through an extended partition: 512 bytes ending in 55 AA, with four 16-byte entries
//! at 0x1BE, each a type and a start and length in sectors. An MBR entry starts from
//! sector 0; in an EBR, a data entry starts from that EBR and a link to the next EBR from
//! the start of the extended partition.

use super::{Entry, Found, MAX_EBRS, NUMBER_LIMIT, Sectors};
use crate::error::Result;
use std::collections::BTreeSet;
use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const RECORD_LEN: usize = 512;
const SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// The type of a GPT's protective entry.
const GPT_PROTECTIVE: u8 = 0xEE;
/// DOS, Windows 98 (LBA) and Linux extended partitions, as Linux recognises them.
const EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// EBRs in a row without a logical partition after which Linux stops following a chain.
const MAX_EMPTY_LINKS: u32 = 100;

/// A boot record as it lies on disk.
#[repr(C)]
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawRecord {
    pub code: [u8; 446],
    pub slots: [RawSlot; 4],
    pub signature: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct RawSlot {
    /// 0x80 for the partition to boot, else 0.
    pub boot: u8,
    pub first_chs: [u8; 3],
    pub kind: u8,
    pub last_chs: [u8; 3],
    pub start: U32,
    pub sectors: U32,
}

impl RawSlot {
    fn is_extended(&self) -> bool {
        EXTENDED.contains(&self.kind)
    }

    fn in_use(&self) -> bool {
        self.sectors.get() != 0
    }
}

/// An MBR or EBR that ends in the signature.
pub struct BootRecord {
    slots: [RawSlot; 4],
}

impl BootRecord {
    /// The record at sector `lba`: `None` if the disk has no such sector or the sector
    /// lacks the signature.
    pub fn read(sectors: &mut Sectors, lba: u64) -> Result<Option<BootRecord>> {
        let Some(bytes) = sectors.read(lba, RECORD_LEN as u64)? else {
            return Ok(None);
        };
        let Ok(raw) = RawRecord::read_from_bytes(&bytes) else {
            return Ok(None);
        };
        Ok((raw.signature == SIGNATURE).then_some(BootRecord { slots: raw.slots }))
    }

    /// Linux's test for a GPT disk: an entry of type 0xEE starting at LBA 1.
    pub fn is_protective(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.kind == GPT_PROTECTIVE && s.start.get() == 1)
    }

    /// Whether a protective MBR also describes partitions of its own.
    pub fn is_hybrid(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.kind != GPT_PROTECTIVE && s.kind != 0)
    }
}

/// Reads the partitions of the MBR `boot` (not a protective one) into `found`; false when
/// Linux would not take it for a partition table.
pub fn read(sectors: &mut Sectors, boot: &BootRecord, found: &mut Found) -> Result<bool> {
    if let Some(slot) = boot.slots.iter().position(|s| !matches!(s.boot, 0 | 0x80)) {
        found.notes.push(format!(
            "sector 0 ends in 55 AA but its entry {} has boot flag {:#04x}, so it is a boot \
             sector, not a partition table",
            slot + 1,
            boot.slots[slot].boot
        ));
        return Ok(false);
    }
    if boot.slots.iter().any(|s| s.kind == GPT_PROTECTIVE) {
        found.notes.push(
            "sector 0 has a GPT entry (type 0xee) that does not start at sector 1, so it is \
             neither a protective MBR nor one Linux reads partitions from"
                .to_string(),
        );
        return Ok(false);
    }
    let mut chains = Chains {
        next: 5,
        ebrs: 0,
        found,
    };
    for (number, slot) in (1..).zip(&boot.slots) {
        if !slot.in_use() {
            continue;
        }
        if slot.is_extended() {
            chains.read(sectors, slot)?;
        } else {
            let first = u64::from(slot.start.get());
            chains.found.entries.push(Entry {
                number,
                first,
                last: first + u64::from(slot.sectors.get()) - 1,
            });
        }
    }
    Ok(true)
}

/// The walk through every chain of EBRs of one MBR, which number their logical
/// partitions in one sequence.
struct Chains<'a> {
    /// The number the next logical partition gets.
    next: u32,
    /// EBRs read so far.
    ebrs: u32,
    found: &'a mut Found,
}

impl Chains<'_> {
    /// Follows the chain of the extended partition `container`, as Linux's
    /// `parse_extended` does, but ending at an EBR already visited.
    fn read(&mut self, sectors: &mut Sectors, container: &RawSlot) -> Result<()> {
        let first = u64::from(container.start.get());
        let size = u64::from(container.sectors.get());
        let (mut at, mut at_size) = (first, size);
        let mut visited = BTreeSet::new();
        let mut empty_links = 0;
        loop {
            empty_links += 1;
            if empty_links > MAX_EMPTY_LINKS {
                return self.stop(format!(
                    "{MAX_EMPTY_LINKS} EBRs in a row hold no logical partition"
                ));
            }
            if !visited.insert(at) {
                return self.stop(format!("the chain of EBRs loops back to sector {at}"));
            }
            self.ebrs += 1;
            if self.ebrs > MAX_EBRS {
                return self.stop(format!("the disk has more than {MAX_EBRS} EBRs"));
            }
            let Some(ebr) = BootRecord::read(sectors, at)? else {
                if at != first {
                    return self.stop(format!(
                        "the EBR at sector {at} lies past the end of the disk or lacks its \
                         signature"
                    ));
                }
                return Ok(());
            };
            for (index, slot) in ebr.slots.iter().enumerate() {
                if !slot.in_use() || slot.is_extended() {
                    continue;
                }
                let offset = u64::from(slot.start.get());
                let len = u64::from(slot.sectors.get());
                let start = at + offset;
                // Linux takes the third and fourth entries only inside both the space
                // the link gave this EBR and the extended partition: they often hold
                // garbage.
                if index >= 2
                    && (offset + len > at_size || start < first || start + len > first + size)
                {
                    continue;
                }
                if self.next == NUMBER_LIMIT {
                    return self.stop(format!(
                        "partition numbers reached Linux's limit of {}",
                        NUMBER_LIMIT - 1
                    ));
                }
                self.found.entries.push(Entry {
                    number: self.next,
                    first: start,
                    last: start + len - 1,
                });
                self.next += 1;
                empty_links = 0;
            }
            let Some(link) = ebr.slots.iter().find(|s| s.in_use() && s.is_extended()) else {
                return Ok(());
            };
            at = first + u64::from(link.start.get());
            at_size = u64::from(link.sectors.get());
        }
    }

    fn stop(&mut self, why: String) -> Result<()> {
        self.found
            .notes
            .push(format!("{why}, so the rest of the chain is not read"));
        Ok(())
    }
}
