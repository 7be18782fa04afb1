#include "train/stop.h"

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstring>

namespace moetp::train {

namespace {

std::atomic<int> g_signal{0};

void on_signal(int sig) {
  if (g_signal.exchange(sig) != 0) {
    // A second signal: stop now, without the checkpoint.
    constexpr char kMsg[] = "moetp: second stop signal: exiting without a checkpoint\n";
    (void)!::write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
    ::_exit(128 + sig);
  }
  constexpr char kMsg[] =
      "moetp: stop requested: finishing the current step, then saving a checkpoint (a second signal exits at once)\n";
  (void)!::write(STDERR_FILENO, kMsg, sizeof(kMsg) - 1);
}

}  // namespace

void install_stop_handlers() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // blocking calls (MPI, file I/O) carry on; the loop checks between steps
  for (int sig : {SIGTERM, SIGINT, SIGUSR1}) sigaction(sig, &sa, nullptr);
}

int stop_signal() { return g_signal.load(); }

void clear_stop_request() { g_signal.store(0); }

}  // namespace moetp::train
