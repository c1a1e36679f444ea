//! `provider: static`: the backends listed in xlb.yaml.

use super::Backend;
use crate::config::StaticProvider;

pub fn backends(p: &StaticProvider) -> Vec<Backend> {
    p.backends.iter().map(|b| Backend { name: b.name.clone(), addr: b.ip, weight: b.weight }).collect()
}
