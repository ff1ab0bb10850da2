// An experiment's report directory.
//
//   runs.csv       one row per run (arm x seed): the arm's recipe, how the run ended, its error
//                  (common/history.h: the median top-1 error over the final 5 epochs)
//   history.csv    every epoch of every run: loss, lr, validation errors
//   table.md       the paper's Table 2 form: per arm kn, peak lr, warmup, scaling, error as mean
//                  +- std over seeds, and the difference to the reference arm
//   error_vs_kn.{png,svg}     Figure 1: error against kn (log2 axis), one line per recipe
//   curves_<arm>.{png,svg}    Figures 2 and 4: training loss and validation error per epoch,
//                             the arm over the reference (means over seeds)
//   plots/         the data files and gnuplot scripts behind the plots (re-runnable by hand)
// The CSVs are the source: RenderReport reads only them, so `lmsgdctl experiment report DIR`
// re-renders a copied or edited directory.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "lmsgd/v1/experiment.pb.h"

namespace lmsgd::ctl {

// Writes runs.csv and history.csv (atomically) from the finished runs, in the given order.
absl::Status WriteExperimentCsv(const std::string& dir, const std::vector<v1::ExperimentRun>& runs);

// Renders table.md and the plots from the directory's CSVs. `table` (may be null) receives the
// table's text. Plots need gnuplot (deploy/setup.sh installs gnuplot-nox); without it the table
// is still written and the error says so.
absl::Status RenderReport(const std::string& dir, std::string* table);

}  // namespace lmsgd::ctl
