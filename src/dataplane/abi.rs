//! The skeleton generated from `src/bpf/*.h` is the ABI: these are its types,
//! made byte-convertible. Nothing here re-declares a layout.

#[allow(clippy::all, clippy::pedantic, dead_code, non_camel_case_types, non_snake_case, unused)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/xlb.skel.rs"));
}

pub use skel::types::{backend as BackendSlot, flow as Flow, flow_key as FlowKey, xdp_md as XdpMd};
pub use skel::types::{handshakes as HandshakesSlot, iface as IfaceSlot, retired as Retired, xlb_tx as TxId};
pub use skel::types::{vlan_tag_key as VlanTagKey, xlb_config as XlbConfig, xlb_counter as CounterId};
pub use skel::{XlbSkel, XlbSkelBuilder};

// SAFETY: plain C structs of integers with explicit padding (see
// xlb_structs.h): every byte pattern is a valid value.
unsafe impl plain::Plain for skel::types::backend {}
unsafe impl plain::Plain for skel::types::flow {}
unsafe impl plain::Plain for skel::types::flow_key {}
unsafe impl plain::Plain for skel::types::xdp_md {}
unsafe impl plain::Plain for skel::types::vlan_tag_key {}
unsafe impl plain::Plain for skel::types::iface {}
unsafe impl plain::Plain for skel::types::retired {}
unsafe impl plain::Plain for skel::types::handshakes {}

/// The raw bytes of an ABI value, as the kernel's map syscalls take them.
pub fn bytes<T: plain::Plain>(v: &T) -> &[u8] {
    // SAFETY: T is Plain: no padding the C side does not also see, no pointers.
    unsafe { plain::as_bytes(v) }
}

/// The raw bytes of an ABI value, for a map syscall to fill in place.
pub fn bytes_mut<T: plain::Plain>(v: &mut T) -> &mut [u8] {
    // SAFETY: T is Plain: every byte pattern written is a valid value.
    unsafe { plain::as_mut_bytes(v) }
}

/// An ABI value from the bytes a map lookup returned (any alignment).
pub fn from_bytes<T: plain::Plain + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    plain::copy_from_bytes(&mut v, b).expect("map value has the ABI size");
    v
}

/// Flow directions (struct flow.dir), from xlb_consts.h.
pub const DIR_TO_BACKEND: u8 = 1;
pub const DIR_TO_CLIENT: u8 = 2;

/// struct flow.tcp_flags: the TCP flags seen (byte 13 of the header) and,
/// above them, the data path's marks (xlb_consts.h XLB_TCP_*, XLB_CT_*).
pub mod tcp_flags {
    pub const FIN: u32 = 0x01;
    pub const SYN: u32 = 0x02;
    pub const RST: u32 = 0x04;
    pub const ACK: u32 = 0x10;
    pub const CT_FIN_FIRST: u32 = 1 << 8;
    pub const CT_FIN_SEQ: u32 = 1 << 9;
    pub const CT_CLOSED: u32 = 1 << 10;
    pub const CT_RESET: u32 = 1 << 11;
    pub const CT_SEQ: u32 = 1 << 12;
    pub const CT_ESTABLISHED: u32 = 1 << 13;
    pub const CT_PROXY: u32 = 1 << 14;
    pub const CT_ANSWERED: u32 = 1 << 15;
}

/// struct iface.flags, from xlb_consts.h.
pub const IFACE_GENERIC: u32 = 1;
