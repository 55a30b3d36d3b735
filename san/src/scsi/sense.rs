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
    /// Sense-key specific FIELD POINTER: the CDB byte an ILLEGAL REQUEST objects to (SKSV
    /// and C/D set). Initiators tell "this field of a command you have is invalid" from
    /// "you lack the command" by it (libiscsi treats an INVALID FIELD IN CDB to MAINTENANCE
    /// IN without a pointer, or pointing at byte 1, as the latter).
    pub field: Option<u16>,
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
            field: None,
        }
    }

    /// This condition with a FIELD POINTER at CDB byte `byte`.
    pub const fn at_cdb_byte(self, byte: u16) -> Self {
        Sense {
            field: Some(byte),
            ..self
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
        if let Some(byte) = self.field {
            out[15] = 0xC0; // SKSV, C/D: the pointer is into the CDB
            out[16..18].copy_from_slice(&byte.to_be_bytes());
        }
    }
}

/// The conditions the unit reports, by name (SPC-5 Annex D codes).
impl Sense {
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB (24h/00h).
    pub const fn invalid_field_in_cdb() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00)
    }

    /// ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST (26h/00h).
    pub const fn invalid_field_in_param_list() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00)
    }

    /// ILLEGAL REQUEST, PARAMETER LIST LENGTH ERROR (1Ah/00h).
    pub const fn param_list_length_error() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h).
    pub const fn lba_out_of_range() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED (39h/00h).
    pub const fn saving_not_supported() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00)
    }

    /// ILLEGAL REQUEST, INVALID RELEASE OF PERSISTENT RESERVATION (26h/04h).
    pub const fn invalid_pr_release() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04)
    }

    /// ILLEGAL REQUEST, INSUFFICIENT REGISTRATION RESOURCES (55h/04h).
    pub const fn insufficient_registration_resources() -> Self {
        Sense::new(key::ILLEGAL_REQUEST, 0x55, 0x04)
    }

    /// DATA PROTECT, WRITE PROTECTED (27h/00h).
    pub const fn write_protected() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x00)
    }

    /// DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h): a thin unit out of space.
    pub const fn space_allocation_failed() -> Self {
        Sense::new(key::DATA_PROTECT, 0x27, 0x07)
    }

    /// MEDIUM ERROR, UNRECOVERED READ ERROR (11h/00h).
    pub const fn read_error() -> Self {
        Sense::new(key::MEDIUM_ERROR, 0x11, 0x00)
    }

    /// MEDIUM ERROR, WRITE ERROR (0Ch/00h).
    pub const fn write_error() -> Self {
        Sense::new(key::MEDIUM_ERROR, 0x0C, 0x00)
    }

    /// HARDWARE ERROR, INTERNAL TARGET FAILURE (44h/00h).
    pub const fn internal_failure() -> Self {
        Sense::new(key::HARDWARE_ERROR, 0x44, 0x00)
    }

    /// MISCOMPARE, MISCOMPARE DURING VERIFY OPERATION (1Dh/00h); INFORMATION holds the offset
    /// of the first byte that differs.
    pub const fn miscompare(offset: u64) -> Self {
        Sense {
            key: key::MISCOMPARE,
            asc: 0x1D,
            ascq: 0x00,
            info: Some(offset),
            field: None,
        }
    }

    /// ABORTED COMMAND, PROTOCOL SERVICE CRC ERROR (47h/05h): the transport lost data of the
    /// command (iSCSI, RFC 7143 §11.4.7.2: a Data-Out digest or sequence error at ERL 0).
    pub const fn protocol_crc_error() -> Self {
        Sense::new(key::ABORTED_COMMAND, 0x47, 0x05)
    }

    /// NO SENSE, NO ADDITIONAL SENSE INFORMATION (REQUEST SENSE with nothing to report).
    pub const fn no_sense() -> Self {
        Sense::new(key::NO_SENSE, 0x00, 0x00)
    }
}

/// Unit attention conditions (additional sense code and qualifier, key UNIT ATTENTION).
pub mod ua {
    use super::{key, Sense};

    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h): first command of a nexus.
    pub const POWER_ON: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    /// SCSI BUS RESET OCCURRED (29h/02h): what a TARGET WARM RESET reports.
    pub const TARGET_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x02);
    /// BUS DEVICE RESET FUNCTION OCCURRED (29h/03h): what a LOGICAL UNIT RESET reports.
    pub const LUN_RESET: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x03);
    /// MODE PARAMETERS CHANGED (2Ah/01h).
    pub const MODE_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x01);
    /// RESERVATIONS PREEMPTED (2Ah/03h).
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x03);
    /// RESERVATIONS RELEASED (2Ah/04h).
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x04);
    /// REGISTRATIONS PREEMPTED (2Ah/05h).
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x05);
    /// CAPACITY DATA HAS CHANGED (2Ah/09h).
    pub const CAPACITY_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2A, 0x09);
}
