//! The Merkle tree an anchor commits to, by the anchor's format version,
//! and inclusion proofs of one record in it. The leaves are the records'
//! hashes, in sequence order.
//!
//! - Version 1 (written now): RFC 6962 — a leaf is SHA-256(0x00 ‖ record
//!   hash), a node SHA-256(0x01 ‖ left ‖ right), the tree split at the
//!   largest power of two below its size (ct-merkle). Domain separation
//!   keeps a node from passing for a leaf, and no leaf is ever duplicated.
//! - Version 0 (anchors written before versions): SHA-256(left ‖ right), an
//!   odd node paired with itself. Still verified; never written, and it
//!   has no inclusion proofs.
//!
//! Roots and paths are built as the leaves stream by ([`RootBuilder`],
//! [`PathBuilder`]), in memory that grows with the tree's height, not its
//! size: an anchor may cover millions of records. Proofs are checked with
//! ct-merkle, which the builders are tested against.

use std::ops::Range;

use ct_merkle::{InclusionProof, RootHash};
use sha2::{Digest, Sha256};

/// The format every new anchor is written in.
pub const CURRENT_VERSION: u8 = 1;
const _: () = assert!(CURRENT_VERSION == 1, "the builders below build format 1");

/// The root of `leaves` in anchor format `version`; `None` for a format
/// this broker does not know.
pub fn root(version: u8, leaves: &[[u8; 32]]) -> Option<[u8; 32]> {
    match version {
        0 => Some(root_v0(leaves)),
        1 => {
            let mut builder = RootBuilder::default();
            leaves.iter().for_each(|leaf| builder.push(leaf));
            Some(builder.root())
        }
        _ => None,
    }
}

/// The sibling hashes from leaf `index` up to the root of `leaves`, in
/// format 1 (RFC 6962's audit path); `None` if `index` is not a leaf.
pub fn prove(leaves: &[[u8; 32]], index: usize) -> Option<Vec<[u8; 32]>> {
    let mut builder = PathBuilder::new(leaves.len() as u64, index as u64)?;
    leaves.iter().for_each(|leaf| builder.push(leaf));
    builder.finish()
}

fn leaf_hash(leaf: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update([0])
        .chain_update(leaf)
        .finalize()
        .into()
}

fn node_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let hasher = Sha256::new().chain_update([1]).chain_update(left);
    hasher.chain_update(right).finalize().into()
}

/// A format-1 root over leaves pushed in order: the perfect subtrees so
/// far, largest first, merged the way a binary counter carries.
#[derive(Debug, Default)]
pub struct RootBuilder {
    subtrees: Vec<[u8; 32]>,
    count: u64,
}

impl RootBuilder {
    pub fn push(&mut self, leaf: &[u8; 32]) {
        let mut node = leaf_hash(leaf);
        self.count += 1;
        let mut carries = self.count.trailing_zeros();
        while carries > 0 {
            let left = self.subtrees.pop().expect("a subtree per set bit");
            node = node_hash(&left, &node);
            carries -= 1;
        }
        self.subtrees.push(node);
    }

    /// RFC 6962's split at the largest power of two is the largest
    /// perfect subtree on the left, so the rest folds in from the right.
    /// The empty tree's root is the hash of nothing.
    pub fn root(&self) -> [u8; 32] {
        let mut subtrees = self.subtrees.iter().rev();
        let Some(last) = subtrees.next() else {
            return Sha256::digest([]).into();
        };
        subtrees.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// Leaf `index`'s audit path in a format-1 tree of `size` leaves, built as
/// the leaves are pushed in order: the siblings on the path are the roots
/// of subtrees that, with the leaf itself, split the leaves into ranges.
#[derive(Debug)]
pub struct PathBuilder {
    index: u64,
    size: u64,
    pushed: u64,
    /// The sibling subtrees' leaf ranges, in path order (deepest first).
    ranges: Vec<Range<u64>>,
    roots: Vec<Option<[u8; 32]>>,
    /// Path slots in leaf order, and the one being built.
    by_start: Vec<usize>,
    at: usize,
    building: RootBuilder,
}

impl PathBuilder {
    /// `None` when `index` is not a leaf of a tree of `size`.
    pub fn new(size: u64, index: u64) -> Option<Self> {
        if index >= size {
            return None;
        }
        let mut ranges = Vec::new();
        let (mut low, mut high) = (0, size);
        while high - low > 1 {
            // The largest power of two below the range's size.
            let split = low + (1 << (63 - (high - low - 1).leading_zeros()));
            if index < split {
                ranges.push(split..high);
                high = split;
            } else {
                ranges.push(low..split);
                low = split;
            }
        }
        ranges.reverse();
        let mut by_start: Vec<usize> = (0..ranges.len()).collect();
        by_start.sort_by_key(|&slot| ranges[slot].start);
        Some(Self {
            index,
            size,
            pushed: 0,
            roots: vec![None; ranges.len()],
            ranges,
            by_start,
            at: 0,
            building: RootBuilder::default(),
        })
    }

    pub fn push(&mut self, leaf: &[u8; 32]) {
        let position = self.pushed;
        self.pushed += 1;
        if position == self.index || position >= self.size {
            return;
        }
        let slot = self.by_start[self.at];
        self.building.push(leaf);
        if position + 1 == self.ranges[slot].end {
            self.roots[slot] = Some(std::mem::take(&mut self.building).root());
            self.at += 1;
        }
    }

    /// The path, once exactly `size` leaves were pushed.
    pub fn finish(self) -> Option<Vec<[u8; 32]>> {
        (self.pushed == self.size).then_some(())?;
        self.roots.into_iter().collect()
    }
}

/// True when `path` leads from `leaf` at `index` to `root` in a format-1
/// tree of `size` leaves.
pub fn verify(root: &[u8; 32], size: u64, leaf: &[u8; 32], index: u64, path: &[[u8; 32]]) -> bool {
    let root = RootHash::<Sha256>::new((*root).into(), size);
    let proof = InclusionProof::<Sha256>::from_bytes(path.concat());
    root.verify_inclusion(leaf, index, &proof).is_ok()
}

/// Format 0: pairs hashed level by level, an odd node paired with itself.
fn root_v0(leaves: &[[u8; 32]]) -> [u8; 32] {
    if leaves.is_empty() {
        return [0u8; 32];
    }
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| {
                let right = pair.get(1).unwrap_or(&pair[0]);
                Sha256::new()
                    .chain_update(pair[0])
                    .chain_update(right)
                    .finalize()
                    .into()
            })
            .collect();
    }
    level[0]
}

/// A record hash as leaf bytes.
pub fn leaf(hash_hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    // Hashes come from our own records; a bad one yields a root that fails
    // verification, which is the right outcome.
    let _ = hex::decode_to_slice(hash_hex, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    #[test]
    fn format_0_pairs_leaves_and_duplicates_an_odd_one() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let pair = |l: [u8; 32], r: [u8; 32]| h(&[&l, &r]);
        assert_eq!(root(0, &[a]), Some(a));
        assert_eq!(root(0, &[a, b]), Some(pair(a, b)));
        assert_eq!(root(0, &[a, b, c]), Some(pair(pair(a, b), pair(c, c))));
        assert_ne!(root(0, &[b, a]), root(0, &[a, b]));
    }

    /// RFC 6962 §2.1, written out by hand: leaves prefixed 0x00, nodes
    /// 0x01, a tree of 3 split 2 + 1 (the lone leaf is not duplicated).
    #[test]
    fn format_1_is_rfc_6962_with_domain_separated_leaves_and_nodes() {
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let leaf = |x: [u8; 32]| h(&[&[0], &x]);
        let node = |l: [u8; 32], r: [u8; 32]| h(&[&[1], &l, &r]);
        assert_eq!(root(1, &[a]), Some(leaf(a)));
        assert_eq!(root(1, &[a, b]), Some(node(leaf(a), leaf(b))));
        let three = node(node(leaf(a), leaf(b)), leaf(c));
        assert_eq!(root(1, &[a, b, c]), Some(three));
        assert_eq!(root(2, &[a]), None, "an unknown format");
        // A duplicated last leaf gives another root (format 0 could not tell).
        assert_ne!(root(1, &[a, b, c, c]), root(1, &[a, b, c]));
        assert_eq!(root(0, &[a, b, c, c]), root(0, &[a, b, c]));
    }

    #[test]
    fn every_leaf_proves_and_nothing_else_does() {
        let leaves: Vec<[u8; 32]> = (0..7u8).map(|i| [i; 32]).collect();
        let top = root(1, &leaves).unwrap();
        for (index, leaf) in leaves.iter().enumerate() {
            let path = prove(&leaves, index).unwrap();
            assert!(verify(&top, 7, leaf, index as u64, &path), "leaf {index}");
            assert!(!verify(&top, 7, &[9; 32], index as u64, &path));
            let other = (index as u64 + 1) % 7;
            assert!(!verify(&top, 7, leaf, other, &path), "another index");
        }
        let path = prove(&leaves, 2).unwrap();
        assert_eq!(path.len(), 3);
        let mut bent = path.clone();
        bent[1][0] ^= 1;
        assert!(!verify(&top, 7, &leaves[2], 2, &bent));
        assert!(!verify(&top, 7, &leaves[2], 2, &path[..2]), "a short path");
        assert_eq!(prove(&leaves, 7), None);
    }

    /// The streaming builders give what ct-merkle's whole tree gives, for
    /// every size up to 70 and every leaf.
    #[test]
    fn roots_and_paths_built_as_leaves_stream_are_ct_merkles() {
        use ct_merkle::mem_backed_tree::MemoryBackedTree;
        for size in 0..=70u8 {
            let leaves: Vec<[u8; 32]> = (0..size).map(|i| [i; 32]).collect();
            let mut tree = MemoryBackedTree::<Sha256, [u8; 32]>::new();
            leaves.iter().for_each(|leaf| tree.push(*leaf));
            let whole: [u8; 32] = tree.root().as_bytes().as_slice().try_into().unwrap();
            assert_eq!(root(1, &leaves), Some(whole), "root of {size}");
            for index in 0..leaves.len() {
                let theirs = tree.prove_inclusion(index);
                let theirs: Vec<&[u8]> = theirs.as_bytes().chunks(32).collect();
                let ours = prove(&leaves, index).unwrap();
                let ours: Vec<&[u8]> = ours.iter().map(|node| node.as_slice()).collect();
                assert_eq!(ours, theirs, "path of {index} in {size}");
            }
        }
        let mut short = PathBuilder::new(5, 1).unwrap();
        (0..4u8).for_each(|i| short.push(&[i; 32]));
        assert_eq!(short.finish(), None, "four leaves of five");
    }
}
