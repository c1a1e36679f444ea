//! The live backend set: turns each provider update into a maglev table for
//! the data plane, keeps backend ids stable, and logs every change.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::maglev::{maglev_table, Backend as MaglevBackend};
use crate::provider::Backend;

pub struct BackendSet {
    size: u32,
    /// Ids are per address and never reused while the process lives, so
    /// per-backend accounting in the data plane stays attributable.
    ids: HashMap<Ipv4Addr, u32>,
    current: Vec<Backend>,
}

/// A data-plane table: slot -> (backend address, backend id).
pub type Table = Vec<Option<(Ipv4Addr, u32)>>;

/// What one update changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<Backend>,
    pub removed: Vec<Backend>,
    /// With the old weight.
    pub reweighted: Vec<(Backend, u32)>,
}

impl Changes {
    /// One line per change, each with the word `backend` and the address
    /// (the user's guide greps the logs for it). Call once the change is live.
    pub fn log(&self) {
        for b in &self.added {
            tracing::info!(name = %b.name, address = %b.addr, weight = b.weight, "backend added: {} {}", b.name, b.addr);
        }
        for (b, old) in &self.reweighted {
            tracing::info!(name = %b.name, address = %b.addr, "backend weight changed: {} {} {old} -> {}", b.name, b.addr, b.weight);
        }
        for b in &self.removed {
            tracing::info!(name = %b.name, address = %b.addr, "backend removed: {} {} (its connections drain)", b.name, b.addr);
        }
    }
}

impl BackendSet {
    pub fn new(size: u32) -> Self {
        BackendSet { size, ids: HashMap::new(), current: Vec::new() }
    }

    pub fn current(&self) -> &[Backend] {
        &self.current
    }

    /// The current set with each backend's data-plane id.
    pub fn current_with_ids(&self) -> Vec<(u32, Backend)> {
        self.current.iter().map(|b| (self.ids[&b.addr], b.clone())).collect()
    }

    /// Applies a new set; returns the table to install and what changed,
    /// or None when nothing that affects selection changed.
    pub fn update(&mut self, next: Vec<Backend>) -> Option<(Table, Changes)> {
        let p = self.prepare(next)?;
        let out = (p.table.clone(), p.changes.clone());
        self.commit(p);
        Some(out)
    }

    /// The table and changes a new set would make, without making it the
    /// current set: commit it once the data plane has taken the table, so a
    /// failed write is tried again with the next update. None when nothing
    /// that affects selection changed.
    pub fn prepare(&mut self, mut next: Vec<Backend>) -> Option<Prepared> {
        next.sort_by_key(|b| b.addr);
        next.dedup_by_key(|b| b.addr);
        if next == self.current {
            return None;
        }
        let mut changes = Changes::default();
        for b in &next {
            match self.current.iter().find(|c| c.addr == b.addr) {
                None => changes.added.push(b.clone()),
                Some(old) if old.weight != b.weight => changes.reweighted.push((b.clone(), old.weight)),
                Some(_) => {}
            }
        }
        changes.removed =
            self.current.iter().filter(|o| !next.iter().any(|b| b.addr == o.addr)).cloned().collect();
        for b in &next {
            let n = self.ids.len() as u32;
            self.ids.entry(b.addr).or_insert(n);
        }
        let maglev: Vec<MaglevBackend> = next
            .iter()
            .map(|b| MaglevBackend { key: b.addr.to_string(), addr: b.addr, weight: b.weight })
            .collect();
        let table = maglev_table(&maglev, self.size)
            .into_iter()
            .map(|slot| slot.map(|i| (next[i as usize].addr, self.ids[&next[i as usize].addr])))
            .collect();
        Some(Prepared { table, changes, next })
    }

    /// Makes a prepared set the current one.
    pub fn commit(&mut self, p: Prepared) {
        self.current = p.next;
    }
}

/// A set ready to install (see `BackendSet::prepare`).
pub struct Prepared {
    pub table: Table,
    pub changes: Changes,
    next: Vec<Backend>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, last: u8, weight: u32) -> Backend {
        Backend { name: name.into(), addr: Ipv4Addr::new(10, 0, 0, last), weight }
    }

    #[test]
    fn unchanged_sets_produce_no_table_and_ids_stay_stable() {
        let mut s = BackendSet::new(251);
        let (t1, c1) = s.update(vec![b("a", 1, 1), b("b", 2, 1)]).expect("first set");
        assert_eq!(c1.added.len(), 2);
        assert!(t1.iter().all(|x| x.is_some()));
        assert!(s.update(vec![b("b", 2, 1), b("a", 1, 1)]).is_none(), "order does not matter");
        let (t2, c2) = s.update(vec![b("b", 2, 1)]).expect("removal changes the table");
        assert_eq!(c2.removed, vec![b("a", 1, 1)]);
        assert!(t2.iter().all(|x| *x == Some((Ipv4Addr::new(10, 0, 0, 2), 1))));
        let (t3, _) = s.update(vec![b("a", 1, 1), b("b", 2, 1)]).unwrap();
        assert_eq!(t1, t3, "same set, same ids, same table");
    }

    #[test]
    fn a_prepared_set_counts_only_once_committed() {
        let mut s = BackendSet::new(251);
        s.update(vec![b("a", 1, 1)]);
        let p = s.prepare(vec![b("a", 1, 1), b("b", 2, 1)]).expect("a change");
        assert_eq!(p.changes.added, vec![b("b", 2, 1)]);
        assert_eq!(s.current(), [b("a", 1, 1)], "not current before commit");
        // Not committed (the write failed): the same set is a change again.
        let p = s.prepare(vec![b("b", 2, 1), b("a", 1, 1)]).expect("still a change");
        s.commit(p);
        assert!(s.prepare(vec![b("a", 1, 1), b("b", 2, 1)]).is_none());
    }

    #[test]
    fn empty_set_empties_the_table() {
        let mut s = BackendSet::new(251);
        s.update(vec![b("a", 1, 1)]);
        let (t, _) = s.update(vec![]).unwrap();
        assert!(t.iter().all(|x| x.is_none()));
    }
}
