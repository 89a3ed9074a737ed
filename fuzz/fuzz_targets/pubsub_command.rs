#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| eserver_fuzz::targets::pubsub_command(data));
