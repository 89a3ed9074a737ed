#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| eserver_fuzz::targets::sim_server(data));
