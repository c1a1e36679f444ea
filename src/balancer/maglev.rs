//! Weighted Maglev lookup table (Eisenbud et al., NSDI'16, section 3.4).
//!
//! Each backend gets a permutation of the `M` slots from two hashes of its key:
//! `offset = h1 % M`, `skip = h2 % (M - 1) + 1`, `perm[j] = (offset + j * skip) % M`. With `M`
//! prime every permutation visits every slot. Backends then take turns claiming their next
//! preferred slot that is still empty until the table is full. Weights set how often a backend
//! gets a turn: every round each backend earns `weight / max_weight` credit and takes one turn
//! per whole credit, so the heaviest backend takes one turn per round.

use std::net::Ipv4Addr;

/// One backend as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity (e.g. the IP as text): the table depends on it, not on list order.
    pub key: String,
    pub addr: Ipv4Addr,
    /// Relative share of new connections, `>= 1` (0 is treated as 1).
    pub weight: u32,
}

/// Builds the lookup table: slot -> index into `backends`. Empty `backends` gives all `None`.
///
/// The result depends only on the set of `(key, addr, weight)` triples, not on their order in
/// `backends`. `size` must be prime (65537 is the usual choice) and should be much larger than
/// the number of backends (the paper suggests `M > 100 * N`).
///
/// # Panics
/// If `backends` is non-empty and `size` is not prime (a permutation would then not cover the
/// table and the fill could never finish).
pub fn maglev_table(backends: &[Backend], size: u32) -> Vec<Option<u32>> {
    let m = size as usize;
    let mut table = vec![None; m];
    if backends.is_empty() || m == 0 {
        return table;
    }
    assert!(is_prime(size), "Maglev table size {size} is not prime");

    // Work in key order so the caller's order cannot matter; report the caller's indices.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&backends[a], &backends[b]);
        (&a.key, a.addr, a.weight).cmp(&(&b.key, b.addr, b.weight))
    });
    let mut perms: Vec<Permutation> =
        order.iter().map(|&i| Permutation::new(&backends[i].key, size)).collect();
    let weights: Vec<u64> = order.iter().map(|&i| u64::from(backends[i].weight.max(1))).collect();
    let max_weight = weights.iter().copied().max().unwrap_or(1);
    let mut credit = vec![0u64; order.len()];

    let mut filled = 0;
    loop {
        for (k, perm) in perms.iter_mut().enumerate() {
            credit[k] += weights[k];
            while credit[k] >= max_weight {
                credit[k] -= max_weight;
                // The permutation covers every slot and one is still empty: this terminates.
                let slot = loop {
                    let slot = perm.next_slot();
                    if table[slot].is_none() {
                        break slot;
                    }
                };
                table[slot] = Some(order[k] as u32);
                filled += 1;
                if filled == m {
                    return table;
                }
            }
        }
    }
}

/// Trial division; fine for table sizes.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n % 2 == 0 {
        return false;
    }
    let n = u64::from(n);
    (3..).step_by(2).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// A backend's walk through its preference list.
struct Permutation {
    next: u64,
    skip: u64,
    size: u64,
}

impl Permutation {
    fn new(key: &str, size: u32) -> Self {
        let size = u64::from(size);
        let offset = hash(SEED_OFFSET, key) % size;
        let skip = if size > 1 { hash(SEED_SKIP, key) % (size - 1) + 1 } else { 1 };
        Permutation { next: offset, skip, size }
    }

    fn next_slot(&mut self) -> usize {
        let slot = self.next;
        self.next = (self.next + self.skip) % self.size;
        slot as usize
    }
}

const SEED_OFFSET: u64 = 0x6d61_676c_6576_3031; // "maglev01"
const SEED_SKIP: u64 = 0x6d61_676c_6576_3032; // "maglev02"

/// FNV-1a 64 over `seed` (little-endian) then `key`, finished with the MurmurHash3 64-bit mixer
/// so that keys differing only in their last bytes still spread over all bits. Fixed constants:
/// stable across processes, platforms and Rust versions (unlike `DefaultHasher`).
fn hash(seed: u64, key: &str) -> u64 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET_BASIS;
    for &byte in seed.to_le_bytes().iter().chain(key.as_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    fn backend(i: usize, weight: u32) -> Backend {
        let addr = Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8);
        Backend { key: addr.to_string(), addr, weight }
    }

    fn backends(n: usize) -> Vec<Backend> {
        (0..n).map(|i| backend(i, 1)).collect()
    }

    /// The table as owner keys, comparable across differently ordered inputs.
    fn owners<'a>(backends: &'a [Backend], table: &[Option<u32>]) -> Vec<&'a str> {
        table.iter().map(|s| backends[s.expect("slot filled") as usize].key.as_str()).collect()
    }

    fn shares(n: usize, table: &[Option<u32>]) -> Vec<usize> {
        let mut counts = vec![0; n];
        for slot in table {
            counts[slot.unwrap() as usize] += 1;
        }
        counts
    }

    #[test]
    fn hash_is_stable() {
        // Golden values: a change here reshuffles every deployed table on upgrade.
        assert_eq!(hash(SEED_OFFSET, "10.0.0.1"), 0x4bac_9008_3380_6d4e);
        assert_eq!(hash(SEED_SKIP, "10.0.0.1"), 0xe0f0_b39e_324e_8d48);
        assert_ne!(hash(SEED_OFFSET, "10.0.0.1"), hash(SEED_OFFSET, "10.0.0.2"));
    }

    #[test]
    fn small_table_is_stable() {
        // Golden table: guards the fill algorithm (turn order, weights) against silent change.
        let bs = vec![backend(0, 1), backend(1, 2), backend(2, 1)];
        let table: Vec<u32> = maglev_table(&bs, 13).into_iter().flatten().collect();
        // Cross-checked against an independent Python transcription of this module.
        assert_eq!(table, [1, 1, 1, 0, 1, 1, 1, 2, 2, 2, 1, 0, 0]);
    }

    #[test]
    fn empty_backends_give_empty_table() {
        let table = maglev_table(&[], M);
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(Option::is_none));
    }

    #[test]
    fn every_slot_filled() {
        for (n, size) in [(1, 7), (3, 13), (1, M), (3, M), (10, M), (7, 251)] {
            let bs: Vec<Backend> = (0..n).map(|i| backend(i, 1 + i as u32 % 4)).collect();
            let table = maglev_table(&bs, size);
            assert_eq!(table.len(), size as usize);
            assert!(table.iter().all(|s| matches!(s, Some(i) if (*i as usize) < n)), "n={n} size={size}");
        }
        // More backends than slots: still full, some backends simply get none.
        let table = maglev_table(&backends(20), 7);
        assert!(table.iter().all(Option::is_some));
    }

    #[test]
    fn deterministic() {
        let bs = backends(10);
        assert_eq!(maglev_table(&bs, M), maglev_table(&bs, M));
    }

    #[test]
    fn order_independent() {
        let bs: Vec<Backend> = (0..10).map(|i| backend(i, 1 + i as u32 % 3)).collect();
        let mut shuffled = bs.clone();
        shuffled.reverse();
        shuffled.rotate_left(3);
        assert_ne!(bs, shuffled);
        let a = maglev_table(&bs, M);
        let b = maglev_table(&shuffled, M);
        assert_ne!(a, b, "indices refer to the caller's order");
        assert_eq!(owners(&bs, &a), owners(&shuffled, &b));
    }

    #[test]
    fn equal_weights_share_evenly() {
        for n in [3, 10, 100] {
            let counts = shares(n, &maglev_table(&backends(n), M));
            let ideal = f64::from(M) / n as f64;
            for (i, &c) in counts.iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(dev <= 0.01, "n={n} backend {i}: {c} slots, ideal {ideal:.1}");
            }
        }
    }

    #[test]
    fn weights_1_2_3() {
        let bs = vec![backend(0, 1), backend(1, 2), backend(2, 3)];
        let counts = shares(3, &maglev_table(&bs, M));
        for (i, &c) in counts.iter().enumerate() {
            let share = c as f64 / f64::from(M);
            let want = (i + 1) as f64 / 6.0;
            assert!((share - want).abs() <= 0.02, "backend {i}: share {share:.4}, want {want:.4}");
        }
    }

    /// Removes each of `removed` in turn from an `n`-backend set and returns the mean and worst
    /// fraction of slots that changed owner among slots the removed backend did not own.
    /// Also checks that adding the backend back restores the original table exactly.
    fn disruption(n: usize, removed: impl Iterator<Item = usize>) -> (f64, f64) {
        let all = backends(n);
        let before = maglev_table(&all, M);
        let before_owners = owners(&all, &before);
        let (mut sum, mut worst, mut runs) = (0.0, 0.0f64, 0);
        for r in removed {
            let mut rest = all.clone();
            let gone = rest.remove(r);
            let after = maglev_table(&rest, M);
            let after_owners = owners(&rest, &after);
            let (mut kept, mut moved) = (0usize, 0usize);
            for (b, a) in before_owners.iter().zip(&after_owners) {
                if *b != gone.key {
                    kept += 1;
                    moved += usize::from(b != a);
                }
            }
            let frac = moved as f64 / kept as f64;
            sum += frac;
            worst = worst.max(frac);
            runs += 1;

            rest.push(gone);
            let restored = maglev_table(&rest, M);
            assert_eq!(owners(&rest, &restored), before_owners, "re-adding {r}");
        }
        (sum / runs as f64, worst)
    }

    // Measured (M = 65537, keys 10.0.x.y, one backend removed, slots of the other backends that
    // changed owner): N=10 mean 0.26%, worst 0.36% (all 10 removals);
    // N=100 mean 0.55%, worst 0.61% (20 removals). Run with --nocapture to see them.
    #[test]
    fn removing_one_backend_disrupts_little() {
        let (mean, worst) = disruption(10, 0..10);
        println!("maglev disruption N=10: mean {:.2}% worst {:.2}%", mean * 100.0, worst * 100.0);
        assert!(worst < 0.03, "N=10 worst disruption {worst}");

        let (mean, worst) = disruption(100, (0..100).step_by(5));
        println!("maglev disruption N=100: mean {:.2}% worst {:.2}%", mean * 100.0, worst * 100.0);
        assert!(worst < 0.03, "N=100 worst disruption {worst}");
    }

    #[test]
    #[should_panic(expected = "not prime")]
    fn non_prime_size_panics() {
        maglev_table(&backends(3), 65536);
    }

    #[test]
    fn primes() {
        for p in [2, 3, 5, 7, 251, 16381, 65537, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        for c in [0, 1, 4, 9, 15, 25, 65536, 65535, 16383, 4_294_967_295, 251 * 251] {
            assert!(!is_prime(c), "{c}");
        }
    }
}
