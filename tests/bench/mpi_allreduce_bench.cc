// Open MPI baseline for `lmsgd-bench allreduce`: MPI_Allreduce (in place, float sum) over the
// same sizes and iteration counts; rank 0 prints one JSON line per size.
//   mpirun -np K lmsgd-bench-mpi MIN_BYTES MAX_BYTES
#include <mpi.h>

#include <cstdlib>
#include <iostream>
#include <vector>

#include "tests/bench/allreduce_bench.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, k = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &k);
  const size_t min_bytes = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4096;
  const size_t max_bytes = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : (256u << 20);
  for (size_t bytes : lmsgd::bench::Sizes(min_bytes, max_bytes)) {
    std::vector<float> buf(bytes / 4, 1.0f);
    const int iters = lmsgd::bench::Iterations(bytes);
    for (int w = 0; w < 2; ++w) {
      MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(buf.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = MPI_Wtime();
    for (int i = 0; i < iters; ++i) {
      MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(buf.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);  // same method for every implementation: barrier, loop, barrier
    const double t = (MPI_Wtime() - t0) / iters;
    if (rank == 0) std::cout << lmsgd::bench::ResultLine("openmpi", "MPI_Allreduce", k, bytes, t) << std::endl;
  }
  MPI_Finalize();
  return 0;
}
