//! Answers a discovery session and a normal session build alike, from the request they answer
//! and the session's StatSN, ExpCmdSN and MaxCmdSN: the Reject of a header, the NOP-In echo of
//! a NOP-Out, and the Logout Response.

use super::pdu::{Bhs, LogoutResponse, NopIn, Reject, BHS_LEN, RESERVED_TAG};

impl Reject {
    /// A Reject whose data segment is the whole rejected header (all but a rejected SNACK).
    pub fn of_header(reason: u8, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) -> Reject {
        Reject {
            reason,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            data_sn: 0,
            data_len: BHS_LEN as u32,
        }
    }
}

impl NopIn {
    /// The answer to NOP-Out `req` (§11.19: its LUN and ITT, no TTT), echoing `data_len`
    /// bytes of its ping data.
    pub fn echo(req: &Bhs, data_len: u32, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) -> NopIn {
        NopIn {
            lun: req.lun(),
            itt: req.itt(),
            ttt: RESERVED_TAG,
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            data_len,
        }
    }
}

impl LogoutResponse {
    /// The answer to Logout Request `req` on connection `cid` (§11.14.1): response 0 (this
    /// connection ends), 1 (CID not found) or 2 (recovery: not at ERL 0).
    pub fn to_request(
        req: &Bhs,
        cid: u16,
        stat_sn: u32,
        exp_cmd_sn: u32,
        max_cmd_sn: u32,
    ) -> LogoutResponse {
        let response = match req.logout_reason() {
            0 => 0,
            1 if req.cid() == cid => 0,
            1 => 1,
            _ => 2,
        };
        LogoutResponse {
            response,
            itt: req.itt(),
            stat_sn,
            exp_cmd_sn,
            max_cmd_sn,
            time2wait: 0,
            time2retain: 0,
        }
    }
}
