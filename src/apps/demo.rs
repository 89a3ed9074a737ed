//! The original EServer demo server's protocol, so its own client works
//! against eserver unchanged.

use crate::handler::{Ctx, Handler};

/// Replies to each frame with `^^^` + payload + payload + `$$$`, unframed,
/// as the demo server of the original C EServer did.
#[derive(Debug, Clone, Copy, Default)]
pub struct EServerDemo;

impl Handler for EServerDemo {
    type Conn = ();

    fn on_open(&self, _ctx: &mut Ctx<'_>) {}

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        ctx.reply_raw_parts(&[b"^^^", msg, msg, b"$$$"]);
    }
}
