// Graceful stop of a training run: SIGTERM, SIGINT and SIGUSR1 set a stop request; the ranks agree
// on it after each step (any rank's request stops all), save a checkpoint and exit with
// kExitStopped. A second signal on a rank ends that rank at once (exit status 128 + signal).
#pragma once

namespace moetp::train {

// Exit status of `moetp train` after a graceful stop (sysexits' EX_TEMPFAIL: "try again later",
// i.e. resume with --resume auto).
inline constexpr int kExitStopped = 75;

// Installs the handlers (idempotent). Handlers only set a flag (and write one line to stderr).
void install_stop_handlers();
// The signal that requested the stop on this rank, or 0.
int stop_signal();
// Clears the request (tests).
void clear_stop_request();

}  // namespace moetp::train
