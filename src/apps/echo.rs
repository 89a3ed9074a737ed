//! Echo: every frame comes back as it was sent.

use crate::handler::{Ctx, Handler};

/// Replies to each frame with its payload, in the same framing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Handler for Echo {
    type Conn = ();

    fn on_open(&self, _ctx: &mut Ctx<'_>) {}

    fn on_message(&self, _conn: &mut (), ctx: &mut Ctx<'_>, msg: &[u8]) {
        // A decoded payload always fits the same codec's limit; if a custom
        // codec disagrees, closing is the only honest answer.
        if ctx.reply(msg).is_err() {
            ctx.close();
        }
    }
}
