// lmsgdctl: see ctl.h for commands and exit codes.
#include <iostream>
#include <string>
#include <vector>

#include "coordinator/ctl/ctl.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return lmsgd::ctl::RunCtl(args, std::cout, std::cerr);
}
