//! Built-in applications, each a plain [`Handler`](crate::Handler).
//!
//! | app | `--app` | behaviour |
//! |---|---|---|
//! | [`Echo`] | `echo` | replies to each frame with the same payload, framed |
//! | [`EServerDemo`] | `eserver-demo` | replies `^^^` + payload + payload + `$$$`, unframed, as the original EServer demo did |
//! | [`PubSub`] | `pubsub` | `SUB`, `UNSUB`, `PUB` topic fan-out (see [`pubsub`]) |

mod demo;
mod echo;
pub mod pubsub;

pub use demo::EServerDemo;
pub use echo::Echo;
pub use pubsub::PubSub;
