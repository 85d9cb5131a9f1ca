/*
 * A damped harmonic oscillator observed at 50 times with Gaussian noise: the simulator of the
 * task in task.yaml, as a user's compiled program would be.
 *
 *     x(t) = exp(-gamma t) cos(omega t) + 0.1 z,   z ~ N(0, 1),   t = 0, 0.2, ..., 9.8 s
 *
 * Usage: oscillator SEED OMEGA GAMMA    (prints the 50 numbers of x, one per line)
 *
 * All randomness comes from SEED, through a generator written out here (splitmix64 and the
 * Box-Muller transform): rand() differs between C libraries, so the same seed would give other
 * data on another machine.
 *
 * Compile: gcc -O2 -o oscillator oscillator.c -lm
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define NUM_TIMES 50
#define TIME_STEP 0.2
#define NOISE 0.1

static const double PI = 3.14159265358979323846;

/* splitmix64 (Steele, Lea and Flood 2014): 64 bits of state, passes BigCrush. */
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform on (0, 1]: the top 53 bits, shifted by one so that log() never sees 0. */
static double uniform(uint64_t *state) {
    return ((splitmix64(state) >> 11) + 1) * (1.0 / 9007199254740992.0);
}

/* Standard normal draws by Box-Muller, each pair of uniforms giving two. */
static double normal(uint64_t *state) {
    static int has_spare = 0;
    static double spare;
    if (has_spare) {
        has_spare = 0;
        return spare;
    }
    double radius = sqrt(-2.0 * log(uniform(state)));
    double angle = 2.0 * PI * uniform(state);
    spare = radius * sin(angle);
    has_spare = 1;
    return radius * cos(angle);
}

static int parse_double(const char *text, double *value) {
    char *end;
    errno = 0;
    *value = strtod(text, &end);
    return errno == 0 && end != text && *end == '\0' && isfinite(*value);
}

int main(int argc, char **argv) {
    double omega, gamma;
    char *end;
    if (argc != 4) {
        fprintf(stderr, "usage: %s SEED OMEGA GAMMA\n", argv[0]);
        return 2;
    }
    errno = 0;
    uint64_t seed = strtoull(argv[1], &end, 10);
    if (errno != 0 || end == argv[1] || *end != '\0') {
        fprintf(stderr, "%s: SEED must be a non-negative integer, got '%s'\n", argv[0], argv[1]);
        return 2;
    }
    if (!parse_double(argv[2], &omega) || !parse_double(argv[3], &gamma)) {
        fprintf(stderr, "%s: OMEGA and GAMMA must be finite numbers\n", argv[0]);
        return 2;
    }
    uint64_t state = seed;
    for (int i = 0; i < NUM_TIMES; i++) {
        double t = i * TIME_STEP;
        double x = exp(-gamma * t) * cos(omega * t) + NOISE * normal(&state);
        printf("%.17g\n", x);
    }
    return 0;
}
