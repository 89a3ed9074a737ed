//! Built-in applications, each a plain [`Handler`](crate::Handler).
//!
//! | app | `--app` | behaviour |
//! |---|---|---|
//! | [`Echo`] | `echo` | replies to each frame with the same payload, framed |
//! | [`EServerDemo`] | `eserver-demo` | replies `^^^` + payload + payload + `$$$`, unframed, as the original EServer demo did |

mod demo;
mod echo;

pub use demo::EServerDemo;
pub use echo::Echo;
