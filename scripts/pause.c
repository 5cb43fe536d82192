/*
 * The pod sandbox's process (containerd's sandbox_image), for a node that cannot pull registry.k8s.io/pause.
 * scripts/build-images builds it with `gcc -static` into the image localhost/warren/pause:<version>, from scratch.
 *
 * Like Kubernetes' own pause: it holds the pod's namespaces open and does nothing else. It exits 0 on SIGINT or
 * SIGTERM, reaps every child that ends up with it (it is PID 1 of the pod when the PID namespace is shared), and
 * otherwise sleeps in pause().
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef VERSION
#define VERSION "unknown"
#endif

static void on_term(int sig) {
  (void)sig;
  _exit(0);
}

static void on_chld(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

static void handle(int sig, void (*fn)(int), int flags) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = fn;
  sa.sa_flags = flags;
  sigemptyset(&sa.sa_mask);
  if (sigaction(sig, &sa, NULL) < 0) {
    perror("sigaction");
    exit(1);
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
    printf("pause %s (warren)\n", VERSION);
    return 0;
  }
  if (getpid() != 1) {
    fprintf(stderr, "pause: warning: not PID 1\n");
  }
  handle(SIGINT, on_term, 0);
  handle(SIGTERM, on_term, 0);
  handle(SIGCHLD, on_chld, SA_NOCLDSTOP | SA_RESTART);
  for (;;) {
    pause();
  }
  return 42; /* unreachable */
}
