//! Sense data (SPC-5 fixed format): sense key, additional sense code and qualifier, and the
//! INFORMATION field (COMPARE AND WRITE's miscompare offset).

/// Sense keys.
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xB;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xE;
}

/// One sense condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key (see [`key`]).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field, when valid.
    pub info: Option<u64>,
}

/// Bytes of fixed-format sense data written by [`Sense::write_fixed`].
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    /// A condition without INFORMATION.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE (20h/00h).
    pub const fn invalid_opcode() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00)
    }

    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED (25h/00h).
    pub const fn lun_not_supported() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }

    /// Fixed-format sense data (response code 70h), 18 bytes.
    pub fn write_fixed(&self, out: &mut [u8; FIXED_SENSE_LEN]) {
        *out = [0; FIXED_SENSE_LEN];
        out[0] = 0x70;
        out[2] = self.key & 0x0F;
        if let Some(info) = self.info {
            out[0] |= 0x80; // VALID: INFORMATION holds the value
                            // Fixed format has 4 bytes of INFORMATION; larger values saturate.
            let v = u32::try_from(info).unwrap_or(u32::MAX);
            out[3..7].copy_from_slice(&v.to_be_bytes());
        }
        out[7] = (FIXED_SENSE_LEN - 8) as u8;
        out[12] = self.asc;
        out[13] = self.ascq;
    }
}
